"""Rewards: the reward API and registry (`registry`), and the built-in reward functions.

Importing this package registers the built-in rewards (`correctness`, `format`,
`think_length`, `asr_wer`, `speech_consistency`, `paralinguistic`, `reward_model`, `tool_call`,
`speech_duration`), so
`get_reward("correctness")` works after `import vocalign.rewards`.
"""

from vocalign.rewards import correctness as _correctness  # noqa: F401  (registers "correctness")
from vocalign.rewards import format as _format  # noqa: F401  (registers "format")
from vocalign.rewards import paralinguistic as _paralinguistic  # noqa: F401  (registers "paralinguistic")
from vocalign.rewards import reward_model as _reward_model  # noqa: F401  (registers "reward_model")
from vocalign.rewards import speech_duration as _speech_duration  # noqa: F401  (registers "speech_duration")
from vocalign.rewards import think_length as _think_length  # noqa: F401  (registers "think_length")
from vocalign.rewards import tool_rewards as _tool_rewards  # noqa: F401  (registers "tool_call")
from vocalign.rewards import transcripts as _transcripts  # noqa: F401  (registers "asr_wer", "speech_consistency")
from vocalign.rewards.registry import (
    REQUIRED,
    RewardError,
    RewardInfo,
    RewardScores,
    RewardSpec,
    check_rewards,
    get_reward,
    list_rewards,
    reward,
    score,
)

__all__ = [
    "REQUIRED",
    "RewardError",
    "RewardInfo",
    "RewardScores",
    "RewardSpec",
    "check_rewards",
    "get_reward",
    "list_rewards",
    "reward",
    "score",
]
