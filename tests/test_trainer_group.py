"""Data-parallel RL training (`rl.trainers`): two ranks on a local Ray train as one process does.

The ranks split every minibatch, divide their losses by the whole minibatch's token count
and sum their gradients (gloo) before each optimiser step, so two ranks take the update
one process takes on the whole minibatch. Bitwise: with the minibatch cut the same way
(two ranks of one micro-batch each, one process of two micro-batches: `rl.grad_accum=2`)
and one torch thread everywhere, the weights are equal to the last bit. Cut differently,
float sums are added in another order and Adam, which divides every gradient by its own
running size, turns that rounding into weight differences of about 1e-6 (LoRA) to 1e-5
(full weights) after three steps at learning rate 1e-3, as one process shows between
`rl.grad_accum=1` and `2`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vocalign.common.ray_cluster import ensure_ray
from vocalign.model.loading import embedded_policy
from vocalign.rewards import RewardSpec
from vocalign.rl.checkpoint import load_checkpoint
from vocalign.rl.config import Recipe, RecipeCheckError, check_recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

RUN = [
    "sft.steps=0", "rl.steps=3", "data.rl_tasks[0].n=16", "data.eval_prompts=4", "eval.suites=[]", "rl.prompts_per_step=2",
    "rl.group_size=4", "rl.minibatches=2", "rl.max_new_tokens=12", "kl.coef=0.05", "rewards=[{name: correctness, weight: 1.0}]",
    "logging.wandb=false", "logging.audio_every=0", "run.progress=false", "run.save_every=3",
]
SAME = ("loss", "grad_norm", "reward/mean", "kl", "entropy", "clip_frac", "approx_kl", "advantage/mean", "response/tokens")
TOLERANCE = 1e-6  # metrics: logged statistics summed over the ranks in another order than over micro-batches


def token_parity(rollouts):
    """A reward that differs within every group from the first step (sampled tokens differ), so every step trains."""
    return [sum(r.response_ids) % 7 / 7 for r in rollouts]


def _run(tmp_path: Path, trainers: int, *more: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    out = tmp_path / f"trainers{trainers}"
    recipe = load_recipe("demo", [*RUN, f"rl.trainers={trainers}", f"run.output_dir={out}", *more], Recipe)
    recipe.rewards.append(RewardSpec(f"{__name__}:token_parity", weight=1.0))
    run_dir = train(recipe, "demo")
    policy = load_checkpoint(run_dir / "checkpoints" / "step-3")
    return read_metrics(run_dir / "metrics.jsonl"), {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["lora", "full", "ppo", "zero1", "zero2", "zero3"])
def test_two_trainers_take_the_update_one_process_takes(tmp_path: Path, weights: str) -> None:
    """GRPO under LoRA and with full weights, PPO with its critic (LoRA policy and critic), and
    full weights through DeepSpeed ZeRO-1, 2 and 3 (each rank an engine of a 2-rank group); the
    ranks generate the rollouts too (colocated)."""
    deepspeed = ["rl.lora.enabled=false", "rl.backend=deepspeed"]
    more = {"lora": [], "full": ["rl.lora.enabled=false"], "ppo": ["rl.algorithm=ppo"],
            "zero1": [*deepspeed, "rl.deepspeed.zero_stage=1"], "zero2": [*deepspeed, "rl.deepspeed.zero_stage=2"],
            "zero3": [*deepspeed, "rl.deepspeed.zero_stage=3"]}[weights]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each rank: the same float reduction order in every matmul
    try:
        (one, w1), (two, w2) = _run(tmp_path, 1, "rl.grad_accum=2", *more), _run(tmp_path, 2, *more)
    finally:
        torch.set_num_threads(threads)
    rl1, rl2 = [r for r in one if r.get("stage") == "rl"], [r for r in two if r.get("stage") == "rl"]
    assert len(rl1) == len(rl2) == 3
    for a, b in zip(rl1, rl2):
        for key in SAME:
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), key
        assert a["grad_norm"] > 0 and a["loss"] != 0  # an update that trains, not two zeros agreeing
        assert b["trainers/allreduce_bytes"] > 0 and "trainers/allreduce_bytes" not in a
        if weights == "ppo":
            assert a["critic/value_loss"] > 0 and b["critic/value_loss"] == pytest.approx(a["critic/value_loss"], rel=TOLERANCE)
    assert w1.keys() == w2.keys()
    # The two ranks generate the rollouts, each its prompt (rl/colocated.py): the same tokens, but
    # their log-probabilities come from batches of another shape than one process's, which moves
    # last bits (measured: 4e-8 LoRA, 1.4e-7 full, 7e-9 PPO). DeepSpeed also averages the ranks'
    # gradients in its own bucket order (the loss is scaled by the number of ranks first; 1.1e-7
    # measured), and ZeRO-3's ranks run the one-pass forward where one process shares a group's
    # prompt (see TrainerRank; 3.6e-7 measured)
    exact = 1e-6 if weights == "zero3" else 2e-7
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= exact


def test_each_rank_trains_on_its_own_half_of_every_minibatch() -> None:
    from vocalign.rl.config import KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer_group import TrainerGroup

    ensure_ray(num_cpus=2)
    config = RLConfig(prompts_per_step=2, group_size=4, minibatches=2, epochs=2)
    group = TrainerGroup(embedded_policy(0), 2, config, LossConfig(), KLConfig(), seed=3)
    try:
        seen = group.rows_seen(8, step=5)
    finally:
        group.close()
    assert len(seen) == 2 and all(len(steps) == 4 for steps in seen)  # 2 epochs x 2 minibatches
    for first, second in zip(*seen):
        assert len(first) == len(second) == 2 and not set(first) & set(second)
    for epoch in range(2):
        rows = [r for rank in seen for steps in rank[2 * epoch : 2 * epoch + 2] for r in steps]
        assert sorted(rows) == list(range(8))  # each epoch covers the batch once, split over the ranks


@pytest.mark.parametrize("overrides, message", [
    (["rl.trainers=3", "rl.prompts_per_step=2", "rl.group_size=4"], "does not split over rl.trainers=3"),
    (["rl.trainers=2", "rl.backend=deepspeed"], "rl.backend=deepspeed trains full weights"),
    (["rl.trainers=2", "rl.prompts_per_step=1", "rl.group_size=4", "rl.grad_accum=4"], "at least rl.grad_accum=4"),
    (["rl.trainers=0"], "rl.trainers=0 must be at least 1"),
    (["rl.trainers=2", "rl.lora.enabled=false", "rl.backend=deepspeed", "rl.deepspeed.zero_stage=3", "rl.forward_engine=fast"],
     "rl.forward_engine=fast reads the weights directly, and ZeRO-3 partitions them"),
])
def test_a_trainer_group_it_cannot_serve_is_refused_before_anything_runs(overrides: list[str], message: str) -> None:
    recipe = load_recipe("demo", overrides, Recipe)
    with pytest.raises(RecipeCheckError, match=message):
        check_recipe(recipe)


def test_more_trainers_than_the_local_ray_has_cpus_fail_at_once() -> None:
    from vocalign.rl.config import KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer_group import TrainerGroup

    ensure_ray(num_cpus=2)
    with pytest.raises(ValueError, match=r"rl.trainers=3 trainer processes need 3 CPUs, but the local Ray has"):
        TrainerGroup(embedded_policy(0), 3, RLConfig(), LossConfig(), KLConfig(), seed=0)


def _two_then_one(out: Path, *more: str) -> tuple[list[dict], list[dict], dict, dict]:
    """Three steps with two ranks; then step 3's checkpoint removed (as if the run had stopped
    after step 2) and the run resumed with one process of two micro-batches. The RL rows and
    final weights of both."""
    import shutil

    def recipe(*extra: str) -> Recipe:
        r = load_recipe("demo", [*RUN, *more, "run.save_every=1", "run.keep_last=3", f"run.output_dir={out}", *extra], Recipe)
        r.rewards.append(RewardSpec(f"{__name__}:token_parity", weight=1.0))
        return r

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uninterrupted = [r for r in read_metrics(train(recipe("rl.trainers=2"), "demo") / "metrics.jsonl") if r.get("stage") == "rl"]
        final = load_checkpoint(out / "checkpoints" / "step-3").model.state_dict()
        shutil.rmtree(out / "checkpoints" / "step-3")
        resumed_dir = train(recipe("rl.trainers=1", "rl.grad_accum=2", "run.resume=true"), "demo")
        resumed = [r for r in read_metrics(resumed_dir / "metrics.jsonl") if r.get("stage") == "rl"]
        again = load_checkpoint(out / "checkpoints" / "step-3").model.state_dict()
    finally:
        torch.set_num_threads(threads)
    return uninterrupted, resumed, final, again


@pytest.mark.slow
def test_a_run_of_two_trainers_resumes_with_one(tmp_path: Path) -> None:
    """Checkpoints hold one optimiser state whatever the number of ranks (theirs are equal), so a
    run trained by two ranks resumes with one and ends where the uninterrupted run ends."""
    uninterrupted, resumed, final, again = _two_then_one(tmp_path / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for key in SAME:
        assert resumed[-1][key] == pytest.approx(uninterrupted[-1][key], rel=TOLERANCE, abs=TOLERANCE), key
    assert "trainers/allreduce_bytes" in uninterrupted[-1] and "trainers/allreduce_bytes" not in resumed[-1]
    # the two ranks generated step 3's rollouts in shards, one process in one batch (see
    # test_two_trainers_take_the_update_one_process_takes; 1.5e-8 measured)
    assert max(float((final[k] - again[k]).abs().max()) for k in final) <= 2e-7


@pytest.mark.slow
@pytest.mark.parametrize("stage, tolerance", [(2, 1e-6), (3, 1e-5)])
def test_a_deepspeed_run_of_two_trainers_resumes_with_one(tmp_path: Path, stage: int, tolerance: float) -> None:
    """DeepSpeed writes one optimiser partition per rank; resuming with another number of ranks
    converts the checkpoint to DeepSpeed's universal layout first. The resumed step's loss is the
    uninterrupted run's (ZeRO-3: within 1e-5, since two ranks run the one-pass forward, see
    TrainerRank, and one process the two-pass forward, whose rounding Adam's state carries on)."""
    out = tmp_path / "run"
    deepspeed = ["rl.lora.enabled=false", "rl.backend=deepspeed", f"rl.deepspeed.zero_stage={stage}"]
    uninterrupted, resumed, final, again = _two_then_one(out, *deepspeed)
    assert (out / "checkpoints" / "step-2" / "deepspeed" / "universal").is_dir()  # converted, beside the original
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("loss", "grad_norm", "kl", "approx_kl"):
        assert resumed[-1][key] == pytest.approx(uninterrupted[-1][key], rel=tolerance, abs=tolerance), key
    assert uninterrupted[-1]["grad_norm"] > 0
    assert max(float((final[k] - again[k]).abs().max()) for k in final) <= tolerance


@pytest.mark.slow
def test_one_trainer_on_each_node_of_a_two_node_cluster(tmp_path: Path) -> None:
    """Two Ray nodes of one CPU each hold one rank each; the run is the one-process run's."""
    import ray
    from ray.cluster_utils import Cluster

    from vocalign.rl.config import KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer_group import TrainerGroup

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.shutdown()
    store = 80 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    try:
        _, local = _run(tmp_path, 1, "rl.grad_accum=2")
        cluster.add_node(num_cpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        ensure_ray(address=cluster.address)
        group = TrainerGroup(embedded_policy(0), 2, RLConfig(prompts_per_step=2, group_size=4), LossConfig(), KLConfig(),
                             seed=0, address=cluster.address)
        try:
            nodes = group.nodes()
        finally:
            group.close()
        assert len(set(nodes)) == 2 and set(nodes) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        _, spread = _run(tmp_path / "cluster", 2, f"ray.address={cluster.address}")
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
        cluster.shutdown()
    # within the two-rank tolerance of test_two_trainers_take_the_update_one_process_takes: the
    # ranks generate in shards (4e-8 measured, as on one node)
    assert max(float((local[k] - spread[k]).abs().max()) for k in local) <= 2e-7


_KILL_AT: list[int] = []  # the reward call at which `kill_a_rank` kills trainer rank 1 (empty: never)
_CALLS: list[int] = []


def kill_a_rank(rollouts):
    """`token_parity`, and on its call number _KILL_AT[0], a SIGKILL to one trainer rank's process (as an OOM kill would)."""
    import os
    import signal

    import psutil

    _CALLS.append(1)
    if _KILL_AT and len(_CALLS) == _KILL_AT[0]:
        ranks = [p for p in psutil.process_iter(["pid", "cmdline"]) if "ray::TrainerRank" in " ".join(p.info["cmdline"] or [])]
        assert len(ranks) == 2, [p.info for p in ranks]
        os.kill(max(p.info["pid"] for p in ranks), signal.SIGKILL)
    return token_parity(rollouts)


@pytest.mark.slow
def test_a_killed_trainer_is_recovered_from_the_last_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """By default the run restarts its trainers from the last checkpoint by itself; with
    rl.trainer_restarts=0 it stops, and run.resume=true continues it. Either way it ends
    bitwise where an uninterrupted run ends, every step logged once."""
    from vocalign.rl.trainer_group import TrainerGroupError

    def recipe(out: Path, *more: str) -> Recipe:
        r = load_recipe("demo", [*RUN, "rl.trainers=2", "run.save_every=1", f"run.output_dir={out}", *more], Recipe)
        r.rewards.append(RewardSpec(f"{__name__}:kill_a_rank", weight=1.0))
        return r

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _KILL_AT.clear()
        whole_dir = train(recipe(tmp_path / "whole"), "demo")
        _CALLS.clear()
        _KILL_AT.append(2)  # the second step's rewards: a rank dies before that step's update
        with pytest.raises(TrainerGroupError, match=r"died during the update at step 2 .* run.resume=true"):
            train(recipe(tmp_path / "killed", "rl.trainer_restarts=0"), "demo")
        assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("step-*")) == ["step-1"]
        _KILL_AT.clear()
        resumed_dir = train(recipe(tmp_path / "killed", "run.resume=true"), "demo")
        _CALLS.clear()
        _KILL_AT.append(2)
        recovered_dir = train(recipe(tmp_path / "recovered"), "demo")  # rl.trainer_restarts: 2 by default
        _KILL_AT.clear()
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert printed.out.count("restarting the trainers from") + printed.err.count("restarting the trainers from") == 1
    whole = [r for r in read_metrics(whole_dir / "metrics.jsonl") if r.get("stage") == "rl"]
    final = load_checkpoint(whole_dir / "checkpoints" / "step-3").model.state_dict()
    for run_dir in (resumed_dir, recovered_dir):
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "rl"]
        assert [r["step"] for r in rows] == [r["step"] for r in whole] == [1, 2, 3]  # no step lost or counted twice
        for a, b in zip(whole, rows):
            for key in SAME:
                assert b[key] == a[key], key
        again = load_checkpoint(run_dir / "checkpoints" / "step-3").model.state_dict()
        assert max(float((final[k] - again[k]).abs().max()) for k in final) == 0.0


@pytest.mark.slow
def test_trainers_with_rollout_workers_sync_the_new_weights_to_them(tmp_path: Path) -> None:
    """Two trainer ranks and one Ray rollout worker: the worker takes each update's weights
    (the driver's, from rank 0), version and checksum verified, and the run is the one-process run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = ["rollouts.num_workers=1", "rollouts.cpus_per_worker=0"]  # beside the two ranks on two CPUs
        (alone, w1), (grouped, w2) = _run(tmp_path, 1, "rl.grad_accum=2"), _run(tmp_path, 2, *worker)
    finally:
        torch.set_num_threads(threads)
    alone = [r for r in alone if r.get("stage") == "rl"]
    grouped = [r for r in grouped if r.get("stage") == "rl"]
    for a, b in zip(alone, grouped):
        for key in SAME:
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), key
        assert b["sync/bytes"] > 0 and b["rollouts/staleness"] == 0.0
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) == 0.0


def _kill_rank_one() -> None:
    import os
    import signal

    import psutil

    ranks = [p for p in psutil.process_iter(["pid", "cmdline"]) if "ray::TrainerRank" in " ".join(p.info["cmdline"] or [])]
    assert len(ranks) == 2, [p.info for p in ranks]
    os.kill(max(p.info["pid"] for p in ranks), signal.SIGKILL)


@pytest.mark.slow
def test_a_trainer_killed_while_writing_a_checkpoint_is_recovered(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ZeRO-2 over two ranks writes each rank's optimiser partition collectively. A rank killed
    once the first DeepSpeed file of step 2's checkpoint is on disk leaves only a temporary
    folder; the group restarts from step 1's checkpoint and ends bitwise where the
    uninterrupted run ends, every step logged once."""
    import time

    from vocalign.rl.trainer_group import TrainerGroup

    gather = TrainerGroup.gather
    seen: dict[str, object] = {}

    def kill_mid_save(self, refs, what):
        folder = seen.get("folder")
        if what == "checkpoint save" and folder is not None and not seen.get("killed"):
            deadline = time.monotonic() + 30
            shards = Path(folder) / "deepspeed"
            while not any(p.is_file() for p in shards.rglob("*")) and time.monotonic() < deadline:
                time.sleep(0.005)  # until a rank has written its first DeepSpeed file
            seen["written_before_kill"] = sorted(p.name for p in shards.rglob("*") if p.is_file())
            _kill_rank_one()
            seen["killed"] = True
        return gather(self, refs, what)

    save = TrainerGroup.save

    def note_folder(self, folder):
        if ".tmp-step-2-" in Path(folder).name:
            seen["folder"] = folder
        return save(self, folder)

    zero2 = ["rl.lora.enabled=false", "rl.backend=deepspeed", "rl.deepspeed.zero_stage=2"]

    def recipe(out: Path) -> Recipe:
        r = load_recipe("demo", [*RUN, *zero2, "rl.trainers=2", "run.save_every=1", f"run.output_dir={out}"], Recipe)
        r.rewards.append(RewardSpec(f"{__name__}:token_parity", weight=1.0))
        return r

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole_dir = train(recipe(tmp_path / "whole"), "demo")
        monkeypatch.setattr(TrainerGroup, "gather", kill_mid_save)
        monkeypatch.setattr(TrainerGroup, "save", note_folder)
        recovered_dir = train(recipe(tmp_path / "recovered"), "demo")
    finally:
        torch.set_num_threads(threads)
    assert seen.get("killed") and seen["written_before_kill"], seen  # the kill landed inside the save
    printed = capsys.readouterr()
    assert "died during the checkpoint save" in printed.out + printed.err
    assert (printed.out + printed.err).count("restarting the trainers from") == 1
    assert not list((tmp_path / "recovered" / "checkpoints").glob(".tmp-*"))  # the half-written folder is gone
    whole = [r for r in read_metrics(whole_dir / "metrics.jsonl") if r.get("stage") == "rl"]
    rows = [r for r in read_metrics(recovered_dir / "metrics.jsonl") if r.get("stage") == "rl"]
    assert [r["step"] for r in rows] == [r["step"] for r in whole] == [1, 2, 3]
    for a, b in zip(whole, rows):
        for key in SAME:
            assert b[key] == a[key], key
    final = load_checkpoint(whole_dir / "checkpoints" / "step-3").model.state_dict()
    again = load_checkpoint(recovered_dir / "checkpoints" / "step-3").model.state_dict()
    assert max(float((final[k] - again[k]).abs().max()) for k in final) == 0.0


@pytest.mark.parametrize("backend", ["torch", "zero3"])
def test_the_ranks_generate_the_rollouts_one_process_generates(backend: str) -> None:
    """Colocated generation: each rank generates its contiguous share of the prompts with its
    replica (three prompts: shares of two and one; one prompt: rank 1 has none, and under
    ZeRO-3 still takes part in the weight gather). The tokens are those of one process; the
    log-probabilities agree within 1e-6 (batches of another shape)."""
    from vocalign.data.tasks import make_task
    from vocalign.model.policy import Sampling
    from vocalign.rl.colocated import RankRollouts
    from vocalign.rl.config import DeepSpeedConfig, KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer_group import TrainerGroup
    from vocalign.rollouts.sync import WeightSyncError, state_checksum
    from vocalign.rollouts.worker import RolloutWorker

    ensure_ray(num_cpus=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    policy = embedded_policy(0)
    if backend == "torch":
        policy.enable_lora(r=4, alpha=8, dropout=0.0)
        config = RLConfig(prompts_per_step=2, group_size=4)
    else:
        config = RLConfig(prompts_per_step=2, group_size=4, backend="deepspeed", deepspeed=DeepSpeedConfig(zero_stage=3))
    policy.freeze_encoder()
    prompts, sampling = make_task("arithmetic", 3, seed=7), Sampling(temperature=1.0, max_new_tokens=10)
    group = TrainerGroup(policy, 2, config, LossConfig(), KLConfig(), seed=0, rollouts={"render_speech": True})
    try:
        source = RankRollouts(group)
        pending = source.generate_async(prompts, 2, sampling, seed=11)
        assert pending.starts == [0, 2]  # rank 0 the first two prompts, rank 1 the third
        shared = source.collect(pending)
        alone = source.generate(prompts[:1], 2, sampling, seed=11)  # rank 1's share is empty
        source.sync({}, 4)
        source.verify(4, state_checksum(policy.trainable_state()))
        with pytest.raises(WeightSyncError, match="do not generate with the driver's weights"):
            source.verify(4, "not-the-checksum")
        stamped = source.generate(prompts[:1], 1, sampling, seed=11)
    finally:
        group.close()
        torch.set_num_threads(threads)
    local = RolloutWorker(policy).generate(prompts, 2, sampling, seed=11)
    assert [r.response_ids for r in shared] == [r.response_ids for r in local]
    assert [r.prompt.id for r in shared] == [r.prompt.id for r in local] and [r.group for r in shared] == [0, 0, 1, 1, 2, 2]
    assert [r.response_ids for r in alone] == [r.response_ids for r in local[:2]]
    for a, b in zip(shared, local):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
        assert (a.waveform is None) == (b.waveform is None)
    assert [r.weight_version for r in shared] == [0] * 6 and stamped[0].weight_version == 4
