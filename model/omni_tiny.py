"""A tiny random Qwen2.5-Omni, built from a config and saved as the released checkpoints are
(config.json and safetensors, spk_dict.pt, tokenizer files, the Whisper feature
extractor's preprocessor_config.json): what the tests and the CPU recipe run on, since
no checkpoint can be downloaded. Its shapes are the released model's rules at toy sizes
(mRoPE sections summing to half a head, the talker's embedding size the thinker's hidden
size, codes token2wav can render); its weights are random.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen2.5-Omni's special tokens, by their released names; the tiny tokenizer's vocabulary is a
# small byte-level BPE besides them
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>",
            "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|tts_pad|>", "<|tts_text_bos|>", "<|tts_text_eod|>",
            "<|tts_text_bos_single|>", "<|speaker_chelsie|>", "<|speaker_ethan|>"]
CORPUS = ["what is five plus three", "the answer is eight", "system user assistant", "hello there, say it slowly",
          "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
          "and visual inputs, as well as generating text and speech."]
CODEC_VOCAB = 64  # the tiny talker's codes: 0..59 speech, then pad, bos, eos, mask
SPEAKERS = {"Chelsie": "<|speaker_chelsie|>", "Ethan": "<|speaker_ethan|>"}


def omni_tokenizer():
    """A small byte-level BPE with Qwen2.5-Omni's special tokens (built offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_omni_config(tokenizer):
    """A Qwen2_5OmniConfig at toy sizes for `tokenizer`'s vocabulary."""
    from transformers import Qwen2_5OmniConfig

    tid = tokenizer.convert_tokens_to_ids
    V, C = len(tokenizer), CODEC_VOCAB
    ids = dict(audio_token_index=tid("<|AUDIO|>"), image_token_index=tid("<|IMAGE|>"), video_token_index=tid("<|VIDEO|>"),
               audio_start_token_id=tid("<|audio_bos|>"), audio_end_token_id=tid("<|audio_eos|>"),
               vision_start_token_id=tid("<|vision_bos|>"), vision_end_token_id=tid("<|vision_eos|>"))
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}  # sums to half of head_dim 8
    thinker = dict(
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                          n_window=100, max_source_positions=1500, output_dim=32),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, rope_parameters=rope),
        user_token_id=tid("<|im_start|>"), **ids)
    talker = dict(vocab_size=C, embedding_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                  rope_parameters=rope, tts_codec_pad_token_id=C - 4, tts_codec_start_token_id=C - 3,
                  tts_codec_end_token_id=C - 2, tts_codec_mask_token_id=C - 1, tts_text_pad_token_id=tid("<|tts_pad|>"),
                  tts_text_start_token_id=tid("<|tts_text_bos|>"), tts_text_end_token_id=tid("<|tts_text_eod|>"), **ids)
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=16,
                        mel_dim=80, num_embeds=C - 4, repeats=2, block_size=24, look_ahead_layers=[1],
                        look_backward_layers=[0], dropout=0.0, enc_emb_dim=8, enc_dim=8, enc_channels=[16, 16, 16, 16, 48],
                        enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=8,
                        enc_res2net_scale=2, enc_se_channels=8),
        bigvgan_config=dict(mel_dim=80, upsample_initial_channel=64, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[5, 3, 2, 2, 2, 2],
                            upsample_kernel_sizes=[11, 7, 4, 4, 4, 4]))
    return Qwen2_5OmniConfig(enable_audio_output=True, thinker_config=thinker, talker_config=talker,
                             token2wav_config=token2wav)


def write_tiny_omni(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Qwen2.5-Omni and save it in the released layout; returns the folder."""
    from transformers import Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

    folder = Path(folder)
    tokenizer = omni_tokenizer()
    config = tiny_omni_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5OmniForConditionalGeneration(config).eval()
        dit = config.token2wav_config.dit_config
        speakers = {name: {"bos_token": tokenizer.convert_tokens_to_ids(token), "cond": torch.randn(1, dit.enc_emb_dim),
                           "ref_mel": torch.randn(1, 48, dit.mel_dim)} for name, token in SPEAKERS.items()}
    model.save_pretrained(folder)
    torch.save(speakers, folder / "spk_dict.pt")  # save_pretrained does not write the voices
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)
    return folder
