"""Rewards of on-policy completions (``--reward_funcs``), their group advantages, and the completions log."""
from __future__ import annotations

import functools
from typing import Dict

import torch

from swift_gkd_plugin.rollout.completion_stats import CompletionWindow
from swift_gkd_plugin.core import Mode
from swift_gkd_plugin.swift.sequence_parallel import gather_shares, group_rank, group_size, share
from swift_gkd_plugin.swift.step.rewards import global_advantages, load_reward_funcs, score_completions
from swift_gkd_plugin.swift.step.token_metrics import TokenMean


class ScoringMixin:
    """ms-swift's scoring stage: rewards and advantages on on-policy steps, the completions log."""

    def _setup_scoring(self) -> None:
        """The reward functions and weights (RL beside the divergence), token-weighted metrics summed on the device
        and read once per logging step (ms-swift's ``MeanMetric`` reads each update), the completions window."""
        self._reward_funcs, self._reward_names = load_reward_funcs(self.args)
        weights = self.args.reward_weights or [1.0] * len(self._reward_names)
        self._reward_weights = torch.tensor(weights, dtype=torch.float32, device=self.accelerator.device)
        self._advantages = None  # this rank's advantages of the current generation batch (on-policy steps)
        for metrics in self.custom_metrics.values():
            metrics.default_factory = functools.partial(TokenMean, device=self.args.device)
        self._completion_columns: Dict[str, list] = {}  # reward columns of the completions log
        self._completions = CompletionWindow()  # sampled lengths and truncation, logged by log()

    def _score_completions(self, samples):
        """On an on-policy step with ``--reward_funcs``: rewards, group advantages (over every rank's completions)
        and their metrics. Logs the sampled completions (the teacher's on seq_kd steps) with their rewards."""
        self._advantages = None
        if not self._gkd_mode.needs_generation:
            return samples
        columns = {}
        if self._gkd_mode is Mode.ON_POLICY and self._reward_funcs:
            local = self._score_once_per_group(samples)
            scale = self.args.scale_rewards or 'group'
            self._advantages, advantages, rewards, per_func = global_advantages(
                local, self._reward_weights, self.args.num_generations, scale, self.accelerator.process_index,
                self.accelerator.num_processes, replicas=group_size())
            self._log_rewards(rewards, per_func, scale)
            columns = {name: per_func[:, i].tolist() for i, name in enumerate(self._reward_names)}
            columns['advantage'] = advantages.tolist()
        self._log_completions(samples, columns)
        return samples

    def _score_once_per_group(self, samples) -> torch.Tensor:
        """``[N, F]`` rewards of this rank's completions; the ranks of a sequence-parallel group (the same rows) each
        score their share of them and gather the rest."""
        device = self.accelerator.device
        mine = share(samples)
        scored = (score_completions(mine, self._reward_funcs, self._reward_names, device, self.state) if mine else
                  torch.zeros(0, len(self._reward_names), device=device))
        if group_size() == 1:
            return scored
        return torch.stack(gather_shares(list(scored.cpu()))).to(device)

    def _log_rewards(self, rewards, per_func, scale: str) -> None:
        from swift.rl_core.advantage import compute_reward_metrics
        stats = compute_reward_metrics(rewards, per_func, self._reward_names, self.args.num_generations, scale)
        metrics = self.custom_metrics['train']
        metrics['gkd/reward'].update(stats.reward_mean)
        metrics['gkd/reward_std'].update(stats.reward_std)
        metrics['gkd/frac_reward_zero_std'].update(stats.frac_reward_zero_std)
        for name in stats.per_func_mean:
            metrics[f'gkd/rewards/{name}/mean'].update(stats.per_func_mean[name])
            metrics[f'gkd/rewards/{name}/std'].update(stats.per_func_std[name])

    def _log_completions(self, samples, columns: Dict[str, list]) -> None:
        """ms-swift's completions log (``--log_completions``), plus one column per reward function and the
        advantage on steps that have them (empty on the others)."""
        if not self.log_completions:
            return
        before = len(self._logs['prompt'])
        if group_rank():  # a sequence-parallel group's first rank logs the rows the group shares
            samples = []
        self._log_student_completions(samples)  # gathers every rank's completions to the main process
        if not self.accelerator.is_main_process:
            return
        added = len(self._logs['prompt']) - before
        for name in set(self._completion_columns) | set(columns):
            past = self._completion_columns.setdefault(name, [None] * before)
            past.extend(columns.get(name, [None] * added))

    def log(self, logs: Dict[str, float], start_time=None) -> None:
        """ms-swift's GKD ``log``; when rewards were logged, the completions table is written here with them. A
        training row gets the sampled completions' length and truncation since the last one (every rank logs: the
        window's reduction is a collective)."""
        if self.model.training:
            logs.update(self._completions.logs(self.accelerator.device))
            self.prefetch.log_into(logs)
        pending = self.accelerator.is_main_process and self.log_completions and len(self._logs['prompt']) > 0
        if self._completion_columns and pending:
            n = len(self._logs['prompt'])
            table = {'step': [str(self.state.global_step)] * n, 'prompt': list(self._logs['prompt']),
                     'completion': list(self._logs['completion'])}
            table.update({name: values[:n] for name, values in self._completion_columns.items()})
            self.jsonl_writer.append(table)
            self._logs['prompt'].clear()
            self._logs['completion'].clear()
            if self.args.report_to and 'wandb' in self.args.report_to:
                import pandas as pd
                import wandb
                if wandb.run is not None:
                    wandb.log({'completions': wandb.Table(dataframe=pd.DataFrame(table))})
        self._completion_columns = {}
        super().log(logs, start_time)
