"""A reward model that hears the question: the policy's own encoder, adaptor and language
model with a scalar head (InstructGPT's and Step-Audio 2's practice of starting the reward
model from the SFT policy, which already hears and computes).

It scores (prompt with its audio, response) in two steps, both from the SFT policy:
- **hear**: a frozen copy of the policy (the ear) writes what it heard, greedily, as the
  policy does in its <think> ("three plus four"); once per distinct prompt, cached;
- **judge**: the prompt, rendered and its audio encoded as the policy does, then
  <think>what was heard</think>, then the response as the assistant turn's text and
  <|EOT|>; the head reads the last hidden state at the final response position (the
  state that has read the whole response). The judge's language model and head train.
Judging against its own transcription is what lets the model check a response against
the question: trained end to end from the audio alone, the same model stayed near
chance on right-vs-wrong numbers and misheard restatements (docs/rewards.md). A spoken
response is scored through its transcript (`source`, as for the text reward model).

Folder layout (what `save` writes and the `reward_model` reward's `path` names): the
judge saved as a policy is (config, weights, tokenizer), `ear/` the same for the ear,
`hearing_head.safetensors` (the head and the likelihood weights) and `hearing_reward_model.json` (what it was
trained on and its held-out accuracy). Training is in
`vocalign.rewards.training.hearing_reward_model`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vocalign.data.types import Prompt, Response
from vocalign.model import chat
from vocalign.model.policy import GREEDY_TEMPERATURE, Policy, PromptBatch, Sampling

MAX_HEARD = 64  # the longest working (thinking, text answer and speech) the ear writes, in tokens
HEAD_NAME = "hearing_head.safetensors"
EAR_FOLDER = "ear"
META_NAME = "hearing_reward_model.json"


def is_hearing_reward_model(folder: str | Path) -> bool:
    return (Path(folder) / HEAD_NAME).is_file()


class HearingRewardModel(nn.Module):
    """`policy`'s model, copied, with a scalar head; the audio encoder stays frozen."""

    def __init__(self, policy: Policy, ear: Policy | None = None) -> None:
        """`policy`'s model is copied into the judge; the ear is a copy of `ear`'s model (default: `policy`'s)."""
        super().__init__()
        if policy.lora:
            raise ValueError("build the reward model from a policy without LoRA adapters (merge them first)")
        special = getattr(policy.tokenizer, "special", {})
        if chat.THINK_START not in special:
            raise ValueError(f"a hearing reward model needs a policy that thinks in <think> (the embedded model, "
                             f"Qwen2-Audio); {type(policy).__name__} has no <think> token")
        self.body = copy.deepcopy(policy.model)
        self.ear = copy.deepcopy((ear or policy).model).eval()
        view = policy.with_model(self.body)
        for p in self.parameters():
            p.requires_grad_(False)
        view.train_language_model()
        self.head = nn.Linear(view.hidden_size, 1, device=policy.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # the judge's own log-likelihood of the response, weighted: at the start the score is
        # the policy's belief in the response given what it heard
        self.likelihood_weight = nn.Parameter(torch.ones(2, device=policy.device))
        self.__dict__["view"] = view  # a Policy over the body: its prompt rendering and sequence packing
        self.__dict__["ear_view"] = policy.with_model(self.ear)
        self.__dict__["heard"] = {}  # prompt id -> the ear's (thinking ids, answer ids)

    @property
    def device(self) -> torch.device:
        return self.view.device

    def encode(self, prompts: Sequence[Prompt]) -> list[list[torch.Tensor]]:
        """Each prompt's encoded audio (the encoder is frozen: no gradients), to reuse across responses.
        The ear writes what it heard in the prompts it has not heard yet."""
        with torch.no_grad():
            batch = self.view.encode_prompts(list(prompts))
            self._hear(batch)
        return batch.encoded

    def _hear(self, batch: PromptBatch) -> None:
        """The ear's greedy working on each new prompt: its thinking (what it heard), and its own
        answer in text and in the words it speaks (at most MAX_HEARD tokens, audio included)."""
        new = [i for i, p in enumerate(batch.prompts) if p.id not in self.heard]
        if not new:
            return
        tok = self.view.tokenizer
        sp = tok.special
        ids = [batch.ids[i] + [sp[chat.THINK_START]] for i in new]
        part = PromptBatch([batch.prompts[i] for i in new], ids, [batch.encoded[i] for i in new])
        greedy = Sampling(GREEDY_TEMPERATURE, 1.0, MAX_HEARD)
        for gen in self.ear_view.generate(part, 1, greedy, seed=0, stop_ids=[sp[chat.TTS_END]]):
            said = tok.parse_response(gen.response_ids)
            # its answer as written ("7"), then again after a space and as spoken (" 7 seven"):
            # a word takes another token after a space, as in a response's "the answer is 7"
            text, spoken = said.text.strip(), said.spoken_text.strip()
            again = " ".join(w for w in (text, spoken) if w)
            self.heard[part.prompts[gen.prompt_index].id] = (
                tok.text_ids(said.think.strip()), tok.text_ids(text) + (tok.text_ids(" " + again) if again else []))

    def response_ids(self, text: str) -> list[int]:
        return self.view.tokenizer.render_response(Response(text=text))

    def forward(self, prompts: Sequence[Prompt], responses: Sequence[str],
                encoded: Sequence[list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Scores [B] of `responses[i]` to `prompts[i]`. `encoded` (from `encode`) skips the
        encoder; rows that share a prompt object and its encoding share its forward."""
        if len(prompts) != len(responses):
            raise ValueError(f"hearing reward model: {len(prompts)} prompts for {len(responses)} responses; give one each")
        if encoded is None or any(p.id not in self.heard for p in prompts):
            encoded = self.encode(prompts)
        tok = self.view.tokenizer
        think = [tok.special[chat.THINK_START]], [tok.special[chat.THINK_END]]
        rendered = [tok.render_prompt(p.messages, [self.body.audio_placeholders(len(a.waveform)) for a in p.audio])
                    for p in prompts]
        # the judge reads the ear's whole working in its <think>; the ear's belief is computed
        # after what it heard alone, as the policy answers
        prompt_ids = [r + think[0] + self.heard[p.id][0] + self.heard[p.id][1] + think[1] for r, p in zip(rendered, prompts)]
        ear_prompt_ids = [r + think[0] + self.heard[p.id][0] + think[1] for r, p in zip(rendered, prompts)]
        response_ids = [self.response_ids(r) for r in responses]
        batch = self.view.sequences(prompt_ids, response_ids, list(encoded))
        hidden = self.view.response_hidden_states(batch)  # [B, R, H]: position t has read the response up to t
        last = torch.tensor([len(r) - 1 for r in response_ids], device=hidden.device)
        final = hidden[torch.arange(len(response_ids), device=hidden.device), last]
        mask = batch.response_mask
        logits = self.body.lm.get_output_embeddings()(hidden).float()
        targets = batch.input_ids[:, batch.prompt_len :]
        judged = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        judged = (judged * mask).sum(-1) / mask.sum(-1)  # per token: bounded
        with torch.no_grad():  # the ear's belief in the response, given what it heard (the SFT policy's, frozen)
            ear_batch = self.ear_view.sequences(ear_prompt_ids, response_ids, list(encoded))
            believed = (self.ear_view.logprobs(ear_batch) * mask).sum(-1) / mask.sum(-1)
        w = self.likelihood_weight
        return self.head(final.float()).squeeze(-1) + w[0] * judged + w[1] * believed

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 64) -> list[float]:
        """Raw scores, batched; each distinct prompt's audio is encoded once."""
        self.eval()
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            part = list(prompts[i : i + batch_size])
            distinct: dict[int, int] = {}
            firsts = [distinct.setdefault(id(p), len(distinct)) for p in part]
            unique = list({id(p): p for p in part}.values())
            enc = self.encode(unique)
            out += self.forward([unique[k] for k in firsts], responses[i : i + batch_size], [enc[k] for k in firsts]).tolist()
        return out

    # -- saving and loading ----------------------------------------------------------------
    def _head_state(self) -> dict[str, torch.Tensor]:
        return {**{f"head.{k}": v for k, v in self.head.state_dict().items()}, "likelihood_weight": self.likelihood_weight}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
            self.likelihood_weight.copy_(state["likelihood_weight"])

    def save(self, folder: str | Path, meta: dict | None = None) -> Path:
        from vocalign.model.loading import save_policy

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_policy(self.view, folder)
        save_policy(self.ear_view, folder / EAR_FOLDER)
        save_file({k: v.detach().contiguous().cpu() for k, v in self._head_state().items()}, str(folder / HEAD_NAME))
        (folder / META_NAME).write_text(json.dumps({"kind": "hearing", **(meta or {})}, indent=2))
        return folder


_LOADED: dict[tuple[str, int], HearingRewardModel] = {}


def load_hearing_reward_model(folder: str | Path) -> HearingRewardModel:
    """The model saved in `folder`, loaded once per process (again if its head changes)."""
    from vocalign.model.loading import load_policy

    folder = Path(folder).expanduser()
    head = folder / HEAD_NAME
    if not head.is_file():
        raise ValueError(f"reward_model: {folder} holds no hearing reward model ({HEAD_NAME} is missing); give the folder "
                         "a `reward_model` stage saved (RUN/reward_models/<stage>)")
    key = (str(folder.resolve()), head.stat().st_mtime_ns)
    if key not in _LOADED:
        # built without drawing from the run's random numbers (the head's initial values are
        # overwritten anyway): a run resumed after the load draws the same numbers as one that
        # loaded it before its checkpoint
        with torch.random.fork_rng(devices=[]):
            try:
                policy, ear = load_policy(folder), load_policy(folder / EAR_FOLDER)
            except (OSError, ValueError) as error:
                raise ValueError(f"reward_model: {folder} cannot be loaded as a hearing reward model ({error})") from error
            model = HearingRewardModel(policy, ear)
        model.load_head_state(load_file(str(head)))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _LOADED[key] = model
    return _LOADED[key]
