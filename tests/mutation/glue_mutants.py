"""A hand-written mutation pass over the trainers' glue (issue 99): each mutant is one plausible bug that changes
what a user's run learns, planted alone in a throw-away git worktree, with the test files expected to notice it.

    python tests/mutation/glue_mutants.py [--only NAME ...] [--worktree DIR]

For each mutant: the worktree's file gets the edit (the old text must occur exactly once), ``pytest -x`` runs the
mutant's tests with the worktree first on ``PYTHONPATH`` (the runs' ranks and zygotes inherit it), and the line
``killed`` (a test failed) or ``SURVIVED`` is printed; the file is restored. Not part of the suite: a pass takes
10-40 minutes on 2 cores."""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSS = 'swift_gkd_plugin/swift/step/loss.py'
BATCHES = 'swift_gkd_plugin/swift/rollout/batches.py'
MEGATRON = 'swift_gkd_plugin/megatron/trainer.py'
MEGATRON_LOSS = 'swift_gkd_plugin/megatron/step/loss.py'
REF = 'tests/test_loss_reference.py'
MREF = 'tests/megatron/test_loss_reference_megatron.py'
CONSISTENCY = 'tests/test_pipeline_consistency.py'

# name: (file, old text, new text, tests)
MUTANTS = {
    'sft_on_policy_steps': (LOSS, 'use_sft = mode is not Mode.ON_POLICY and self.args.sft_alpha > 0',
                            'use_sft = self.args.sft_alpha > 0', [REF]),
    'fused_normaliser_times_coef': (LOSS, 'normalizer=normalizer / self.args.gkd_divergence_coef if',
                                    'normalizer=normalizer * self.args.gkd_divergence_coef if', [REF]),
    'fused_sft_normaliser_over_coef': (LOSS, 'sft_normalizer=normalizer,',
                                       'sft_normalizer=normalizer / self.args.gkd_divergence_coef,', [REF]),
    'dense_without_divergence_coef': (LOSS, 'total = per_token.sum() * self.args.gkd_divergence_coef',
                                      'total = per_token.sum()', [REF]),
    'dense_sft_at_loss_temperature': (LOSS, 'F.cross_entropy(student.float(), setup.labels',
                                      'F.cross_entropy(student.float() / self.args.temperature, setup.labels', [REF]),
    'normaliser_not_over_ranks': (LOSS, 'normalizer = max(step_tokens, 1.0) / world',
                                  'normalizer = max(step_tokens, 1.0)',
                                  [CONSISTENCY + '::test_step_loss_is_the_same_on_one_process_two_ranks_and_zero2']),
    'eval_normaliser_over_all_ranks': (LOSS, 'world = self.accelerator.num_processes if self.model.training else '
                                       'group_size()', 'world = self.accelerator.num_processes',
                                       ['tests/test_sequence_parallel.py']),
    'dense_rl_without_coef': (LOSS, 'total = total + self.args.gkd_rl_coef * pg', 'total = total + pg',
                              ['tests/test_rl.py']),
    'fused_rl_without_coef': (LOSS, 'folded = self.args.gkd_rl_coef * token_advantages',
                              'folded = token_advantages', ['tests/test_rl.py']),
    'pg_term_on_every_mode': (LOSS, 'if mode is Mode.ON_POLICY and advantages is not None and '
                              'self.args.gkd_rl_coef > 0:', 'if advantages is not None and self.args.gkd_rl_coef > 0:',
                              ['tests/test_rl.py']),
    'dense_sampled_kl_without_coef': (LOSS, 'total = total + self.args.gkd_sampled_kl_coef * policy_gradient_loss(',
                                      'total = total + policy_gradient_loss(', ['tests/test_sampled_kl_pipeline.py']),
    'fused_sampled_kl_without_coef': (LOSS, 'folded = folded + self.args.gkd_sampled_kl_coef * '
                                      'self._sampled_kl_advantages(', 'folded = folded + self._sampled_kl_advantages(',
                                      ['tests/test_sampled_kl_pipeline.py']),
    'ref_kl_without_coef': (LOSS, 'total = total + coef * self.reference.kl_sum(',
                            'total = total + self.reference.kl_sum(', ['tests/test_reference_kl.py']),
    'rollout_weights_ignored': (LOSS, '        return correction.weights', '        return 1.0',
                                ['tests/test_sampled_kl_pipeline.py', 'tests/test_rl.py']),
    'step_tokens_of_the_last_micro_batch': (BATCHES, "counts[i // group] += batch['gkd_whole_tokens']",
                                            "counts[i // group] = batch['gkd_whole_tokens']", [REF]),
    'step_tokens_not_reduced_over_ranks': (BATCHES, "counts = self.accelerator.reduce(counts, reduction='sum').tolist()",
                                           'counts = counts.tolist()',
                                           [CONSISTENCY + '::test_step_loss_is_the_same_on_one_process_two_ranks_and_zero2']),
    'eval_batches_grouped_by_accumulation': (BATCHES, 'group = self.args.gradient_accumulation_steps if training else 1',
                                             'group = self.args.gradient_accumulation_steps', [REF]),
    'rewards_on_seq_kd_steps': ('swift_gkd_plugin/swift/step/scoring.py',
                                'if self._gkd_mode is Mode.ON_POLICY and self._reward_funcs:', 'if self._reward_funcs:',
                                ['tests/test_rl.py::test_rewards_score_the_students_samples_only']),
    'seq_kd_sampled_by_the_student': ('swift_gkd_plugin/swift/rollout/sampling.py',
                                      '        return self._generate_with_teacher(samples)',
                                      '        return self.prefetch.samples(samples, step)',
                                      ['tests/test_pipeline_modes.py', 'tests/test_teacher_placement.py']),
    'megatron_seq_kd_sampled_by_the_student': (MEGATRON, 'teacher=mode is Mode.SEQ_KD)', 'teacher=False)',
                                               ['tests/megatron/test_seq_kd_teacher_megatron.py']),
    'megatron_sft_over_every_position': (MEGATRON, 'sft = (per_token_ce * student_mask).sum()',
                                         'sft = per_token_ce.sum()', [MREF]),
    'megatron_sft_on_policy_steps': (MEGATRON, 'if self.sft_alpha > 0 and data_source is not DataSource.STUDENT:',
                                     'if self.sft_alpha > 0:', [MREF]),
    'megatron_untempered': (MEGATRON, 'shards = dict(temperature=args.temperature,', 'shards = dict(temperature=1.0,',
                            [MREF]),
    'megatron_count_off_by_one': (MEGATRON, 'count = torch.tensor(n_student, device',
                                  'count = torch.tensor(n_student + 1, device', [MREF]),
    'megatron_padded_vocab_kept': (MEGATRON_LOSS, 'teacher_mask.sum()), student_mask, teacher_mask)\n    student = '
                                   'mask_padded_vocab(student_shard[student_mask], vocab_start, vocab_size)',
                                   'teacher_mask.sum()), student_mask, teacher_mask)\n    student = '
                                   'student_shard[student_mask]', [MREF]),
    'megatron_teacher_view_ignored': (MEGATRON_LOSS, 'teacher_mask = student_mask if teacher_labels is None else '
                                      'teacher_labels != IGNORE_INDEX\n    n_student', 'teacher_mask = student_mask\n'
                                      '    n_student',
                                      ['tests/megatron/test_megatron_rlhf.py']),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', nargs='*', help='mutant names (default: all)')
    parser.add_argument('--worktree', default='/tmp/gkd_mutants', help='a git worktree of HEAD, made if missing')
    args = parser.parse_args()
    tree = args.worktree
    if not os.path.isdir(tree):
        subprocess.run(['git', '-C', ROOT, 'worktree', 'add', '--detach', tree, 'HEAD'], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tree, os.environ.get('PYTHONPATH')) if p),
               OMP_NUM_THREADS='1')
    survivors = []
    for name in args.only or MUTANTS:
        path, old, new, tests = MUTANTS[name]
        target = os.path.join(tree, path)
        with open(target) as f:
            text = f.read()
        assert text.count(old) == 1, f'{name}: the old text occurs {text.count(old)} times in {path}'
        started = time.time()
        try:
            with open(target, 'w') as f:
                f.write(text.replace(old, new))
            proc = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests],
                                  cwd=tree, env=env, capture_output=True, text=True)
        finally:
            with open(target, 'w') as f:
                f.write(text)
        last = (proc.stdout.strip().splitlines() or [''])[-1]
        verdict = 'killed' if proc.returncode == 1 else 'SURVIVED' if proc.returncode == 0 else f'error {proc.returncode}'
        if proc.returncode == 0:
            survivors.append(name)
        print(f'{verdict:9} {name:40} {time.time() - started:6.0f} s  {last}', flush=True)
    print(f'{len(args.only or MUTANTS)} mutants, {len(survivors)} survived: {", ".join(survivors) or "none"}')


if __name__ == '__main__':
    main()
