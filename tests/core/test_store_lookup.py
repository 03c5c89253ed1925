"""core/scores/lookup.py: the request that keys a stored row, and the run's top-k of a stored answer."""
import torch

from swift_gkd_plugin.core.scores.lookup import most_likely, row_request, scored_positions


def test_a_row_scores_the_positions_whose_next_token_is_a_label():
    labels = torch.tensor([-100, -100, 7, 8, -100, 9])
    assert scored_positions(labels).tolist() == [1, 2, 4]
    assert row_request(torch.tensor([1, 2, 7, 8, 3, 9]), labels) == ([1, 2, 7, 8, 3, 9], [1, 2, 4])


def test_most_likely_keeps_each_positions_k_largest_of_the_stored_top_k():
    torch.manual_seed(0)
    logprobs = torch.randn(5, 8, dtype=torch.float64).log_softmax(-1)
    ids = torch.randint(0, 1000, (5, 8)).sort(-1).values  # ascending, as the store keeps them
    top_ids, top = most_likely(ids, logprobs, 3)
    expected, order = logprobs.topk(3, dim=-1)
    assert torch.equal(top, expected) and torch.equal(top_ids, ids.gather(-1, order))
    assert top.dtype == torch.float64


def test_most_likely_breaks_ties_towards_the_lower_id_and_pads_a_narrow_store():
    ids, logprobs = torch.tensor([[2, 5, 9]]), torch.tensor([[-1.0, -0.5, -1.0]])
    assert most_likely(ids, logprobs, 2)[0].tolist() == [[5, 2]]
    top_ids, top = most_likely(ids, logprobs, 5)
    assert top_ids.tolist() == [[5, 2, 9, 0, 0]] and top[0, 3:].tolist() == [float('-inf')] * 2
