"""The single controller: one RL step, top to bottom, driving the Ray worker groups; and the training loop.

    trainer = RLTrainer(load_config(RunConfig, "configs/rloo_tiny.yaml"))
    trainer.fit()
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmmrl_megatron.algorithms import (
    AdvantageInputs,
    compute_advantages,
    global_aggregation_count,
    kl_estimate,
    kl_reward_penalty,
    make_kl_controller,
    make_reward_moments,
    nonconstant_group_mask,
    shape_scores,
    token_mean_kl,
)
from lmmrl_megatron.config.loader import dump_yaml, to_dict
from lmmrl_megatron.config.schema import RunConfig
from lmmrl_megatron.config.validate import validate_run_config
from lmmrl_megatron.learner.lr_schedule import learning_rate
from lmmrl_megatron.learner.rollout_batch import PromptInputs, RolloutBatch
from lmmrl_megatron.plan.memory import swaps
from lmmrl_megatron.rollout.engine import MultimodalPrompt, SamplingParams
from lmmrl_megatron.trainer import faults
from lmmrl_megatron.trainer.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from lmmrl_megatron.trainer.errors import DataError, one_line
from lmmrl_megatron.trainer.groups import PolicyGroup, RolloutGroup, init_ray, make_placement_group, put_batch
from lmmrl_megatron.trainer.metrics import MetricsLogger
from lmmrl_megatron.trainer.step_math import step_metrics
from lmmrl_megatron.trainer.storage import check_checkpoint_storage, expected_checkpoint_bytes, explain_save_failure


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    timings[f"time/{phase}"] = time.perf_counter() - start


class RLTrainer:
    def __init__(self, config: RunConfig) -> None:
        from transformers import AutoProcessor

        from lmmrl_megatron.eval.evaluator import Evaluator

        validate_run_config(config)  # first: a bad config fails in milliseconds, before any worker loads weights
        self.config = config
        self.save_path = Path(config.checkpoint.save_path)
        self.checkpoints = CheckpointManager(self.save_path / "checkpoints", config.checkpoint.keep_last)
        # Before any work: a checkpoint folder that cannot take a checkpoint fails now, not after the first step.
        self.expected_checkpoint_bytes = expected_checkpoint_bytes(config)
        check_checkpoint_storage(self.checkpoints.root, self.expected_checkpoint_bytes, config.checkpoint.keep_last)
        self.checkpoints.remove_debris()  # what saves that a crash interrupted left behind
        self.last_saved: Path | None = None  # the newest checkpoint this trainer committed
        self._started_ray = False
        self.reward = self.policy = self.rollout = self.placement_group = None
        dump_yaml(config, self.save_path / "config.yaml")
        processor = AutoProcessor.from_pretrained(config.model.pretrain)
        self.tokenizer = processor.tokenizer
        self.evaluator = None
        try:
            self._started_ray = init_ray(config)  # a run that cannot be placed stops before data or weights are read
            self.prompts = self._build_prompts(processor)
            self.evaluator = Evaluator(config, processor) if config.eval.enabled else None
            self.use_reference = config.algorithm.needs_reference
            self.use_critic = config.algorithm.needs_critic
            self.reward = self._make_reward()
            pg, policy_offset, rollout_offset = make_placement_group(config)
            self.placement_group = pg
            self.policy = PolicyGroup(config, pg, policy_offset, self.use_reference, self.use_critic)
            self.rollout = RolloutGroup(config, pg, rollout_offset)
            self.swap_colocated = swaps(config)  # the planner's test, so its memory phases are this step's
            self.kl_controller = make_kl_controller(config.algorithm)
            self.reward_moments = make_reward_moments(config.algorithm)
            self.step = 0
            resume_from = self.checkpoints.resolve_resume(config.checkpoint.resume)
            if resume_from is not None:
                self._load(resume_from)
            superseded = self.checkpoints.supersede_after(self.step)
            if superseded:
                print(f"checkpoints: {len(superseded)} of an earlier run after step {self.step} "
                      f"({', '.join(p.name for p in superseded)}) moved to {superseded[0].parent}")
            if self.swap_colocated:
                self.policy.offload()  # between steps the policy holds only its weights; the engines generate
            self.metrics = MetricsLogger(
                self.save_path, config.logging, config.trainer.max_steps, start_step=self.step, run_config=to_dict(config)
            )
        except BaseException:
            self.close()  # what was built so far: workers, placement group, Ray
            raise

    def _build_prompts(self, processor):
        from lmmrl_megatron.data.loader import build_prompt_loader

        try:
            return build_prompt_loader(self.config.data, processor, self.config.rollout.rollout_batch_size)
        except (ValueError, OSError) as exc:  # bad records, missing or unreadable sources: the message says which
            raise DataError(f"data: {exc}") from exc

    def _make_reward(self):
        from lmmrl_megatron.reward.client import RemoteRewardClient
        from lmmrl_megatron.reward.scorer import BatchFunctionScorer, RewardScorer

        if self.config.reward.remote_function:
            return BatchFunctionScorer(self.config.reward)  # OpenRLHF's reward_func.py, same call as a server
        if self.config.reward.remote_rm_url:
            return RemoteRewardClient.from_config(self.config.reward)
        return RewardScorer(self.config.reward)

    # ------------------------------------------------------------------------------------------------ one step
    def rl_step(self) -> dict[str, float]:
        cfg, alg = self.config, self.config.algorithm
        n = cfg.rollout.n_samples_per_prompt
        timings: dict[str, float] = {}
        swap: dict[str, float] = {}  # colocated: GB and GB/s of the swap's two directions

        # 1. Prompts, processed once (token ids, pixel values, image grids), reused for generation and training.
        encoded = self.prompts.next_batch().prompts
        prompts = [MultimodalPrompt.from_encoded(p) for p in encoded]

        # 2. Generate n responses per prompt with the rollout engines' per-token log-probs.
        params = SamplingParams(
            n=n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=cfg.trainer.seed + self.step,
        )
        with timed(timings, "generate"):
            outputs = self.rollout.generate(prompts, params)
        if self.swap_colocated:  # the engines give the GPUs back to the policy until the sync
            with timed(timings, "onload"):
                self.rollout.sleep()
                swap = self.policy.onload()
        # The step's one padding: every response, right-padded, with the engines' log-probs as a column.
        rollout = RolloutBatch.from_rows(
            prompts=[PromptInputs(p.input_ids, p.pixel_values, p.image_grid_thw) for p in encoded],
            prompt_index=[i for i, group in enumerate(outputs) for _ in group],
            response_ids=[out.response_ids for group in outputs for out in group],
            rollout_logprobs=[out.logprobs for group in outputs for out in group],
        )

        # 3. Score every response; shape (normalise, clip) the scores whatever their source.
        with timed(timings, "reward"):
            raw_scores = self._score(encoded, rollout)
        scores = shape_scores(raw_scores, self.reward_moments, alg.reward_clip)

        # 4. Optionally drop prompts whose n rewards are all equal: no signal for group baselines.
        keep = list(range(rollout.num_rows))
        if cfg.trainer.filter_uniform_groups:
            # When every group is uniform the step trains on all of them (zero advantages, zero policy gradient).
            keep = nonconstant_group_mask(raw_scores, n).nonzero().flatten().tolist() or keep
        batch, scores = rollout.select(keep), scores[keep]

        # 5. Old log-probs (and reference log-probs, critic values) from the trainer's own forward passes.
        with timed(timings, "logprob"):
            shared = put_batch(batch)
            old = self.policy.forward(shared, "actor")
            ref = self.policy.forward(shared, "reference") if self.use_reference else None
            values = self.policy.forward(shared, "critic") if self.use_critic else None
        batch = replace(
            batch,
            old_logprobs=old.values,
            ref_logprobs=None if ref is None else ref.values,
            old_values=None if values is None else values.values,
        )
        mask = batch.response_mask
        # The engines generated with the weights the trainer holds now: their log-probs must agree with ours.
        mismatch = float((batch.old_logprobs - batch.rollout_logprobs).abs()[mask.bool()].max())

        # 6. Advantages: KL as a per-token reward penalty (unless it is a loss term), then the estimator.
        kl_coef = self.kl_controller.value
        kl_rewards, kl = None, torch.zeros_like(mask)
        if ref is not None:
            old_lp, ref_lp = batch.old_logprobs, batch.ref_logprobs
            kl = kl_estimate(old_lp, ref_lp, alg.kl_estimator, alg.kl_clamp) * mask
            if alg.kl_in_reward:
                kl_rewards = kl_reward_penalty(old_lp, ref_lp, mask, alg.kl_estimator, kl_coef, alg.kl_clamp)
        inputs = AdvantageInputs(scores=scores, mask=mask, kl_rewards=kl_rewards, values=batch.old_values)
        advantages = compute_advantages(alg, inputs, n)
        batch = replace(batch, advantages=advantages.advantages, returns=advantages.returns)

        faults.inject("train", self.step + 1, self.policy)  # LMMRL_FAULT: a test's kill, nothing otherwise

        # 7. PPO epochs over mini-batches of train_batch_size sequences, one optimizer step each (critic first),
        #    at this step's learning rates.
        lrs = {"lr/actor": learning_rate(cfg.trainer.actor, self.step, cfg.trainer.max_steps)}
        if self.use_critic:
            lrs["lr/critic"] = learning_rate(cfg.trainer.critic, self.step, cfg.trainer.max_steps)
        train_metrics: list[dict[str, float]] = []
        max_len = cfg.rollout.max_new_tokens
        with timed(timings, "train"):
            for _ in range(alg.ppo_epochs):
                for mini in batch.split(cfg.trainer.train_batch_size):
                    # seq_mean_token_sum_norm's constant length: the longest response the engines may generate
                    count = global_aggregation_count([mini.response_mask], alg.loss_agg_mode, max_response_length=max_len)
                    normaliser = float(count)
                    shared_mini = put_batch(mini)
                    mini_metrics = self.policy.train_actor(shared_mini, normaliser, kl_coef, lrs["lr/actor"])
                    if self.use_critic:
                        mini_metrics |= self.policy.train_critic(shared_mini, normaliser, lrs["lr/critic"])
                    train_metrics.append(mini_metrics)
        # The controller observes the per-token KL, the `kl` logged below: algorithm.kl_target is in those units.
        self.kl_controller.update(token_mean_kl(kl, mask), batch.num_rows)

        # 8. Push the new weights to the rollout engines (TP gathered, PP collected, bucketed). Colocated, the
        # policy first frees its gradients and optimizer state, and the engines' KV cache comes back only after
        # the weights are in, so the two roles never hold their peaks at once.
        if self.swap_colocated:
            with timed(timings, "offload"):
                swap |= self.policy.offload()
                self.rollout.wake_up_weights()
        with timed(timings, "sync"):
            sync = self.policy.push_weights(self.rollout.engines)
        if self.swap_colocated:
            self.rollout.wake_up_kv_cache()

        metrics = step_metrics(
            raw_scores, batch.response_lengths, mask, kl, old.entropy, train_metrics, advantages, kl_coef, keep
        )
        return metrics | {"rollout/logprob_abs_diff_max": mismatch} | lrs | sync | swap | timings

    def evaluate(self) -> dict[str, float]:
        """Evaluate the policy as the engines hold it now on `eval.sets`, when `eval` says this step is due
        (before training, every `eval_steps`, after the last step); the metrics to log, {} when not due.
        Between steps a colocated policy is already offloaded and the engines awake, as generation needs."""
        if self.evaluator is None or not self.config.eval.is_due(self.step, self.config.trainer.max_steps):
            return {}
        result = self.evaluator.evaluate(self.rollout.generate, self.step)
        if self.config.eval.save_samples:
            result.write_samples(self.save_path / "eval" / f"step_{self.step:08d}.jsonl")
        return result.metrics

    def _score(self, encoded, rollout: RolloutBatch) -> torch.Tensor:
        n = self.config.rollout.n_samples_per_prompt
        rows = range(rollout.num_rows)
        responses = self.tokenizer.batch_decode([rollout.response(i) for i in rows], skip_special_tokens=True)
        labels = [encoded[i // n].answer for i in rows]
        if self.config.reward.remote_rm_url:
            queries = self.tokenizer.batch_decode([torch.cat([rollout.prompt(i).ids, rollout.response(i)]) for i in rows])
            prompts = [encoded[i // n].raw_message for i in rows]
            result = self.reward.score(queries, prompts, labels)
        else:
            prompts = [encoded[i // n].prompt_text for i in rows]
            result = self.reward.score(responses, labels, prompts)
        self._reward_counters = result.counters
        return torch.tensor(result.rewards, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        cfg = self.config
        try:
            if self.step == 0 and (before := self.evaluate()):
                self.metrics.log(0, before)
            while self.step < cfg.trainer.max_steps:
                metrics = self.rl_step()
                self.step += 1
                metrics.update(self._reward_counters.to_metrics())  # reward/num_failures, num_timeouts, ...
                metrics.update({k: float(v) for k, v in self.prompts.skipped.to_metrics().items()})
                metrics.update(self.evaluate())
                self.metrics.log(self.step, metrics)
                save_steps = cfg.checkpoint.save_steps
                if (save_steps and self.step % save_steps == 0) or self.step == cfg.trainer.max_steps:
                    self.save()
        finally:
            self.metrics.close()
        self.report()
        print(f"logs: {self.save_path / 'metrics.jsonl'}  tensorboard: {self.save_path / 'tensorboard'}")
        print(f"checkpoints: {self.checkpoints.root} (latest: {self.checkpoints.latest()})")
        return self.save_path

    def report(self) -> None:
        """Plots of the run beside metrics.jsonl and the before/after table of its evaluations (eval_summary.md).
        A failure here is printed, not raised: the training it reports on is done and saved."""
        from lmmrl_megatron.trainer.eval_summary import run_eval_summary
        from lmmrl_megatron.trainer.plots import plot_run

        try:
            plots = plot_run(self.save_path)
            print(f"plots: {plots[0]} and {len(plots) - 1} panels in {self.save_path / 'plots'}")
            table = run_eval_summary(self.save_path / "metrics.jsonl")
        except Exception as exc:  # noqa: BLE001 - reporting must not turn a finished run into a failed one
            print(f"warning: the run report was not written: {exc!r}")
            return
        if table is not None:
            (self.save_path / "eval_summary.md").write_text(table + "\n")
            print(table)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        staging = self.checkpoints.stage(self.step)
        try:
            if self.swap_colocated:
                self.policy.onload()  # the optimizer state is saved from where it lives while training
            self.policy.save_checkpoint(str(staging))
            if self.swap_colocated:
                self.policy.offload()
            if self.config.checkpoint.save_hf:
                self.policy.save_hf(str(staging / "hf"))
            faults.inject("save", self.step)  # LMMRL_FAULT: a test's kill, nothing otherwise
            state = {
                "step": self.step,
                "sampler": self.prompts.state_dict(),
                "rng": capture_rng_state(),
                "kl_controller": self.kl_controller.state_dict(),
                "reward_moments": None if self.reward_moments is None else self.reward_moments.state_dict(),
            }
            torch.save(state, staging / "trainer_state.pt")
            (staging / "config.json").write_text(json.dumps(to_dict(self.config), default=str))
            self.last_saved = self.checkpoints.commit(self.step)
        except Exception as exc:
            explained = explain_save_failure(exc, staging, self.step, self.expected_checkpoint_bytes)
            self.checkpoints.abort(self.step)  # a half-written checkpoint may hold the space the next one needs
            if explained is not None:
                raise explained from exc
            raise
        return self.last_saved

    def _load(self, directory: Path) -> None:
        state = torch.load(directory / "trainer_state.pt", weights_only=False)
        self.policy.load_checkpoint(str(directory))
        self.step = state["step"]
        self.prompts.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.reward_moments is not None and state["reward_moments"] is not None:
            self.reward_moments.load_state_dict(state["reward_moments"])
        # The engines loaded the initial HF weights; give them the resumed ones.
        self.policy.push_weights(self.rollout.engines)

    def close(self) -> None:
        """Stop this run's workers, free its placement group, and shut Ray down if this trainer started it.

        Never raises, and may be called twice: it runs while another error (a worker's death) is on its way to
        the user, who must read that one. Each part is stopped even when an earlier one fails."""
        from ray.util.placement_group import remove_placement_group

        def stop(what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                print(f"lmmrl: could not stop the {what}: {one_line(exc, 200)}", file=sys.stderr)

        reward, policy, rollout, pg = self.reward, self.policy, self.rollout, self.placement_group
        self.reward = self.policy = self.rollout = self.placement_group = None
        if reward is not None:
            stop("reward scorer", reward.close)
        if self.evaluator is not None:
            stop("evaluator", self.evaluator.close)
        if policy is not None:
            stop("policy workers", policy.shutdown)
        if rollout is not None:
            stop("rollout engines", rollout.shutdown)
        if pg is not None:
            stop("placement group", lambda: remove_placement_group(pg))
        if self._started_ray:
            import ray

            self._started_ray = False
            stop("Ray", ray.shutdown)
