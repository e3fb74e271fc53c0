"""`audio_search`: picks a voice from a voice library by its description."""

from __future__ import annotations

import json
from pathlib import Path

from .registry import ToolCallError, ToolOutput, tool
from .text_search import bm25_scores, words

# Voice id -> its description and the espeak-ng voice the detokenizer renders it with. The
# pitch words follow measured mean F0 on one English sentence: Storm 84 Hz, m1 92 Hz,
# m3 103 Hz, m7 104 Hz (wide range), grandpa 104 Hz, f1 178 Hz, f3 208 Hz, f5 204 Hz,
# grandma 196 Hz; whisper and croak are unvoiced / rough variants.
DEFAULT_VOICE_LIBRARY: dict[str, dict[str, str]] = {
    "deep_male": {"description": "a deep low male voice, very low pitch", "voice": "en-us+Storm"},
    "low_male": {"description": "a low calm male voice", "voice": "en-us+m1"},
    "neutral_male": {"description": "a neutral clear male voice, medium pitch", "voice": "en-us+m3"},
    "lively_male": {"description": "a lively bright expressive male voice", "voice": "en-us+m7"},
    "old_male": {"description": "an old man, an elderly grandfather's voice", "voice": "en-us+grandpa"},
    "warm_female": {"description": "a warm low female voice", "voice": "en-us+f1"},
    "high_female": {"description": "a high clear female voice, high pitch", "voice": "en-us+f3"},
    "bright_female": {"description": "a bright cheerful young female voice", "voice": "en-us+f5"},
    "old_female": {"description": "an old woman, an elderly grandmother's voice", "voice": "en-us+grandma"},
    "whisper": {"description": "a quiet whispering voice, a whisper", "voice": "en-us+whisper"},
    "croaky": {"description": "a rough croaky hoarse voice", "voice": "en-us+croak"},
}


def load_voice_library(library: str | Path | dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """A voice library: the default, a dict, or a JSON/YAML file mapping voice ids to
    `{description: ..., voice: <espeak voice, e.g. en-us+m3>}`."""
    if library is None:
        return DEFAULT_VOICE_LIBRARY
    if not isinstance(library, dict):
        path = Path(library)
        if not path.is_file():
            raise ToolCallError(f"the voice library {str(library)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            library = yaml.safe_load(text)
        else:
            library = json.loads(text)
    if not isinstance(library, dict) or not library:
        raise ToolCallError("the voice library must map voice ids to {description, voice}")
    for voice_id, entry in library.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("description"), str) or not isinstance(entry.get("voice"), str):
            raise ToolCallError(f"voice library entry {voice_id!r} needs a 'description' and a 'voice' (strings)")
    return library


def search_voice(query: str, library: dict[str, dict[str, str]]) -> tuple[str, float]:
    """The voice id whose description (and id) best matches `query` by BM25, and its score."""
    ids = list(library)
    scores = bm25_scores(query, [words(f"{v} {library[v]['description']}") for v in ids])
    best = max(range(len(ids)), key=lambda i: (scores[i], -i))
    return ids[best], scores[best]


@tool(
    "audio_search",
    description="Find a voice by its description (e.g. \"a low calm male voice\"); the rest of the answer is spoken in it.",
    parameters={"query": {"type": "string", "description": "how the voice should sound"}},
    options=("library",),
)
def audio_search_tool(query: str, library: str | dict | None = None) -> ToolOutput:
    voices = load_voice_library(library)
    voice_id, score = search_voice(query, voices)
    if score <= 0:
        raise ToolCallError(
            f"no voice matches {query!r}; the voices: " + "; ".join(v["description"] for v in voices.values())
        )
    entry = voices[voice_id]
    return ToolOutput(f"voice {voice_id}: {entry['description']}", {"voice": entry["voice"], "voice_id": voice_id})
