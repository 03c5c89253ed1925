"""SKD's sampler (core/speculative.py) against plain decoding loops written from the definition.

The models are toy language models whose next-token logits are a function of the row's unmasked history, recomputed
from scratch at every column: they check the batch layout (holes, position ids, each column fed once) as well as the
acceptance and cut logic.
"""
import pytest
import torch

from swift_gkd_plugin.core.speculative import (first_rejection, in_teacher_topk, position_ids, scored_forward,
                                               speculative_sample, topk_logits)

V, EOS, PAD = 11, 10, 0


class ToyLM:
    """Next-token logits from the last two unmasked tokens and the number of tokens so far (a fixed random table)."""

    def __init__(self, seed: int, eos_bias: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, V, generator=g, dtype=torch.float64) * 2
        self.by_length = torch.randn(64, V, generator=g, dtype=torch.float64)
        self.by_length[:, EOS] += eos_bias

    def next_logits(self, history):
        a, b = (history[-2], history[-1]) if len(history) > 1 else (0, history[-1])
        return (self.table[a, b] + self.by_length[len(history) % 64]).float()

    def forward(self):
        """A :data:`Forward` callback: checks that columns arrive in order, once, with the right position ids."""
        state = {'ids': None}

        def call(new_ids, mask, pos):
            seen = 0 if state['ids'] is None else state['ids'].shape[1]
            assert seen + new_ids.shape[1] == mask.shape[1], 'columns must be fed consecutively, each once'
            state['ids'] = new_ids if state['ids'] is None else torch.cat([state['ids'], new_ids], 1)
            assert torch.equal(pos, position_ids(mask)[:, seen:])
            out = torch.zeros(new_ids.shape[0], new_ids.shape[1], V)
            for row in range(new_ids.shape[0]):
                for j in range(new_ids.shape[1]):
                    c = seen + j
                    if mask[row, c]:
                        history = state['ids'][row, :c + 1][mask[row, :c + 1].bool()].tolist()
                        out[row, j] = self.next_logits(history)
            return out

        return call


PROMPTS = [[3, 4, 5], [7], [1, 2]]


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def student_sampler(seed, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    return lambda logits, ids: torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)[:, 0]


def plain_sampling(model, prompts, sampler, max_new):
    """The student's own decoding loop: every step samples every row, finished rows' draws are discarded."""
    done, out = [False] * len(prompts), [[] for _ in prompts]
    while not all(done):
        logits = torch.stack([model.next_logits(p + o) for p, o in zip(prompts, out)])
        tokens = sampler(logits, None)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                out[row].append(token)
                done[row] = token == EOS or len(out[row]) >= max_new
    return out


def teacher_sampling(model, prompts, temperature, generator, max_new):
    """The teacher's own decoding loop: one draw for the unfinished rows per token, in row order."""
    done, out = [False] * len(prompts), [[] for _ in prompts]
    while not all(done):
        rows = [r for r in range(len(prompts)) if not done[r]]
        logits = torch.stack([model.next_logits(prompts[r] + out[r]) for r in rows])
        draws = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        for r, token in zip(rows, draws.tolist()):
            out[r].append(token)
            done[r] = token == EOS or len(out[r]) >= max_new
    return out


def run_skd(student, teacher, *, top_k=3, max_new=12, draft_len=4, accept=None, seed=0, teacher_seed=1,
            temperature=1.0, stop=None, prompts=PROMPTS, teacher_forward=None):
    ids, mask = left_padded(prompts)
    teacher_forward = teacher_forward or teacher.forward()
    return speculative_sample(student.forward(), teacher_forward, ids, mask, top_k=top_k, max_new_tokens=max_new,
                              eos_token_ids=[EOS], pad_token_id=PAD, sample_student=student_sampler(seed),
                              teacher_temperature=temperature, generator=torch.Generator().manual_seed(teacher_seed),
                              draft_len=draft_len, accept=accept, stop=stop)


def test_acceptance_rule_is_teacher_topk_with_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0]] * 5)
    tokens = torch.arange(5)
    # top-1: both tokens tied at the maximum; top-2 also; top-3 adds the 2.0 token
    assert in_teacher_topk(logits, tokens, 1).tolist() == [False, True, False, True, False]
    assert in_teacher_topk(logits, tokens, 3).tolist() == [False, True, False, True, True]
    assert in_teacher_topk(logits, tokens, 5).all() and in_teacher_topk(logits, tokens, 99).all()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=g)
    tokens = torch.randint(0, 50, (200, ), generator=g)
    rank = (logits > logits.gather(1, tokens[:, None])).sum(1)  # tokens strictly more likely
    for k in (1, 5, 25):
        assert torch.equal(in_teacher_topk(logits, tokens, k), rank < k)
        # temperature does not change the rule
        assert torch.equal(in_teacher_topk(logits / 0.3, tokens, k), rank < k)
    with pytest.raises(ValueError, match='k must be >= 1'):
        in_teacher_topk(logits, tokens, 0)


def test_first_rejection_is_the_cut_point():
    accepted = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]]).bool()
    proposed = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    assert first_rejection(accepted, proposed).tolist() == [4, 1, 0, 4]


@pytest.mark.parametrize('draft_len', [1, 3, 8])
def test_teacher_accepting_everything_is_plain_student_sampling(draft_len):
    student, teacher = ToyLM(1, eos_bias=1.5), ToyLM(2)
    want = plain_sampling(student, PROMPTS, student_sampler(5), max_new=12)
    assert len({len(c) for c in want}) > 1, 'rows should finish at different lengths'
    got = run_skd(student, teacher, accept=lambda logits, tokens: torch.ones_like(tokens, dtype=torch.bool),
                  seed=5, max_new=12, draft_len=draft_len)
    assert got.completions == want
    assert got.replaced == 0 and got.proposed == sum(map(len, want))
    # top-K with K = V accepts everything as well
    assert run_skd(student, teacher, top_k=V, seed=5, draft_len=draft_len).completions == want


def test_teacher_accepting_nothing_is_teacher_sampling():
    student, teacher = ToyLM(1), ToyLM(2, eos_bias=1.0)
    want = teacher_sampling(teacher, PROMPTS, 0.7, torch.Generator().manual_seed(9), max_new=10)
    got = run_skd(student, teacher, accept=lambda logits, tokens: torch.zeros_like(tokens, dtype=torch.bool),
                  teacher_seed=9, temperature=0.7, max_new=10)
    assert got.completions == want
    n = sum(map(len, want))
    assert got.replaced == got.proposed == n
    assert got.rounds == [len(c) for c in want]  # one verification per token
    # the blocks shrink to one token after the first full rejection: about one student forward per token
    assert got.teacher_forwards == max(got.rounds)
    assert got.student_forwards <= got.teacher_forwards + 4 - 1


def test_blocks_grow_back_to_draft_len_when_the_teacher_accepts():
    student, teacher = ToyLM(1, eos_bias=-50), ToyLM(2, eos_bias=-50)
    got = run_skd(student, teacher, top_k=V, max_new=40, draft_len=8)
    assert got.rounds == [5, 5, 5] and got.teacher_forwards == 5  # 40 tokens in blocks of 8


def test_top1_with_a_near_greedy_teacher_gives_teacher_greedy_decoding():
    student, teacher = ToyLM(1), ToyLM(2, eos_bias=0.5)
    greedy = teacher_sampling(teacher, PROMPTS, 1e-6, torch.Generator().manual_seed(0), max_new=15)
    got = run_skd(student, teacher, top_k=1, temperature=1e-6, max_new=15, draft_len=5)
    assert got.completions == greedy
    assert 0 < got.replaced <= got.proposed
    assert got.teacher_forwards == max(got.rounds)


def test_every_kept_student_token_is_in_the_teacher_topk():
    student, teacher = ToyLM(3, eos_bias=0.5), ToyLM(4, eos_bias=0.5)
    k = 3
    calls = []

    def recording_accept(logits, tokens):
        ok = in_teacher_topk(logits, tokens, k)
        calls.append(ok)
        return ok

    got = run_skd(student, teacher, top_k=k, accept=recording_accept, max_new=20, draft_len=4)
    # every token of a completion: in the teacher's top-k given its prefix, or a teacher sample (the replacements)
    outside = 0
    for prompt, completion in zip(PROMPTS, got.completions):
        for i, token in enumerate(completion):
            logits = teacher.next_logits(prompt + completion[:i])
            outside += int(not in_teacher_topk(logits[None], torch.tensor([token]), k)[0])
    assert outside <= got.replaced
    assert 0 < got.replaced < got.proposed


def test_budget_eos_and_stop():
    student, teacher = ToyLM(5, eos_bias=-50), ToyLM(6, eos_bias=-50)  # never EOS
    got = run_skd(student, teacher, max_new=7, draft_len=3)
    assert [len(c) for c in got.completions] == [7, 7, 7]
    student, teacher = ToyLM(5, eos_bias=50), ToyLM(6, eos_bias=50)  # always EOS
    got = run_skd(student, teacher, max_new=7, draft_len=3)
    assert got.completions == [[EOS]] * 3
    # a stop callback (stop words) ends a completion where it first holds
    student, teacher = ToyLM(5, eos_bias=-50), ToyLM(6, eos_bias=-50)
    got = run_skd(student, teacher, max_new=20, draft_len=6, stop=lambda c: len(c) >= 2 and c[-1] == c[-2] or
                  len(c) == 9)
    for c in got.completions:
        assert len(c) == 9 or (c[-1] == c[-2] and all(c[i] != c[i + 1] for i in range(len(c) - 2)))


def test_bad_arguments():
    student, teacher = ToyLM(1), ToyLM(2)
    with pytest.raises(ValueError, match='max_new_tokens'):
        run_skd(student, teacher, max_new=0)
    with pytest.raises(ValueError, match='draft_len'):
        run_skd(student, teacher, draft_len=0)
    with pytest.raises(ValueError, match='teacher_temperature'):
        run_skd(student, teacher, temperature=0.0)


def test_topk_logits_is_the_truncated_teacher_distribution():
    """From the definition, in float64: with the top-k as logits the acceptance rule (K <= k) is the rule on the full
    logits, and softmax at temperature T is p_i^(1/T) / sum_{j in top-k} p_j^(1/T) on the top-k, 0 elsewhere (values
    and gradients); ids beyond the vocabulary are dropped."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 30, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 30, (40, ), generator=g)
    k = 7
    top = torch.log_softmax(logits, -1).topk(k, -1)
    lp = top.values.float().requires_grad_(True)
    x = topk_logits(top.indices, lp, 30)
    for K in (1, 3, k):
        assert torch.equal(in_teacher_topk(x, tokens, K), in_teacher_topk(logits, tokens, K))
    weights = torch.randn(40, 30, generator=g, dtype=torch.float64)
    for T in (0.5, 1.0, 2.0):
        p = torch.softmax(logits, -1)
        lp64 = top.values.clone().requires_grad_(True)
        powered = torch.zeros_like(p).scatter(-1, top.indices, lp64.exp() ** (1 / T))  # p_i^(1/T) on the top-k
        want = powered / powered.sum(-1, keepdim=True)
        assert torch.allclose(want.gather(-1, top.indices), p.gather(-1, top.indices) ** (1 / T) /
                              (p.gather(-1, top.indices) ** (1 / T)).sum(-1, keepdim=True))
        got = torch.softmax(topk_logits(top.indices, lp, 30) / T, -1)
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
        assert bool((got == 0).sum(-1).eq(30 - k).all())
        (grad,) = torch.autograd.grad((got.double() * weights).sum(), lp)
        (grad64,) = torch.autograd.grad((want * weights).sum(), lp64)
        assert torch.allclose(grad.double(), grad64, atol=1e-5, rtol=0)
    # a padded teacher head: ids beyond the student's vocabulary are cut, the others kept
    x = topk_logits(torch.tensor([[31, 2, 40]]), torch.tensor([[-0.1, -1.0, -2.0]]), 30)
    assert x.shape == (1, 30) and x[0, 2] == -1.0 and torch.isinf(x).sum() == 29


def toy_scorer(model, k, calls):
    """A stateless top-k scorer on a toy teacher (one from-scratch pass per sequence), recording what it is asked."""

    def score(asked):
        calls.append(asked)
        out = []
        for ids, positions in asked:
            logits = torch.stack([model.next_logits(ids[:p + 1]) for p in positions])
            top = torch.log_softmax(logits.double(), -1).float().topk(k, -1)
            out.append((top.indices, top.values))
        return out

    return score


def test_a_topk_scorer_covering_the_vocabulary_verifies_as_the_full_teacher():
    """A stateless scorer that returns the whole vocabulary (k = V): the same completions, counts and rounds as the
    teacher's own forward, for several K and temperatures; it is asked for the last prompt column and the drafted
    columns only, once per teacher forward."""
    student, teacher = ToyLM(3, eos_bias=0.5), ToyLM(4, eos_bias=0.5)
    for K, T in ((1, 1.0), (3, 0.7), (5, 1.3)):
        want = run_skd(student, teacher, top_k=K, temperature=T, max_new=20, draft_len=4)
        calls = []
        got = run_skd(student, teacher, top_k=K, temperature=T, max_new=20, draft_len=4,
                      teacher_forward=scored_forward(toy_scorer(teacher, V, calls), V, first_column=2))
        assert got == want
        assert 0 < got.replaced < got.proposed
        assert len(calls) == got.teacher_forwards
        first = calls[0]
        for (ids, positions), prompt in zip(first, PROMPTS):
            assert positions[0] == len(prompt) - 1 and ids[:len(prompt)] == prompt


class TruncatedLM(ToyLM):
    """A toy teacher whose logits are its log-probabilities on its top-k and -inf elsewhere (its top-k truncation)."""

    def __init__(self, model, k):
        self.model, self.k = model, k

    def next_logits(self, history):
        top = torch.log_softmax(self.model.next_logits(history).double(), -1).float().topk(self.k, -1)
        return topk_logits(top.indices, top.values, V)


def test_a_topk_scorer_is_the_top_k_truncation_of_the_teacher():
    """k < V (K <= k): SKD through the scorer is SKD with the teacher's top-k truncation as the teacher (the same
    completions and counts), so every drafted token is judged as by the full teacher (the rule on the top-k is the rule
    on the full logits, test above) and every replacement is drawn from the top-k renormalised: every token of the
    completions is in the teacher's top-k given its prefix, and those outside its top-K were replaced."""
    student, teacher = ToyLM(3, eos_bias=0.5), ToyLM(4, eos_bias=0.5)
    K, k = 2, 4
    for T in (0.6, 1.0):
        got = run_skd(student, teacher, top_k=K, max_new=20, draft_len=4, temperature=T,
                      teacher_forward=scored_forward(toy_scorer(teacher, k, []), V, first_column=2))
        assert got == run_skd(student, TruncatedLM(teacher, k), top_k=K, max_new=20, draft_len=4, temperature=T)
        assert 0 < got.replaced < got.proposed
        outside_K = 0
        for prompt, completion in zip(PROMPTS, got.completions):
            for i, token in enumerate(completion):
                logits = teacher.next_logits(prompt + completion[:i])[None]
                assert in_teacher_topk(logits, torch.tensor([token]), k)[0]
                outside_K += int(not in_teacher_topk(logits, torch.tensor([token]), K)[0])
        assert outside_K <= got.replaced
