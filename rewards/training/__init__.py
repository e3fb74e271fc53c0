"""Offline jobs that make the reward path's assets: they are never imported while a run scores.

- `ctc_asr`: trains and evaluates the embedded speech recognizer (`vocalign.rewards.ctc_asr`);
- `calibrate_paralinguistic`: measures the prosody thresholds of `vocalign.rewards.paralinguistic`;
- `preference_data`: synthetic preference pairs for the learned reward model.
"""
