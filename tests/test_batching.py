import torch

from flatquant_modifier.batching import merge_calls


def _call(seed, seq=5, mask=None):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, seq, 4, generator=g),
        "position_embeddings": (torch.ones(1, seq, 2), torch.zeros(1, seq, 2)),
        "attention_mask": mask if mask is not None else torch.zeros(1, 1, seq, seq),
        "use_cache": False,
        "past_key_values": None,
    }


def test_merges_hidden_states_and_shares_identical_arguments():
    calls = [_call(i) for i in range(5)]
    batches = merge_calls(calls, batch_size=2)
    assert [b["hidden_states"].shape[0] for b in batches] == [2, 2, 1]
    torch.testing.assert_close(
        batches[0]["hidden_states"],
        torch.cat([calls[0]["hidden_states"], calls[1]["hidden_states"]]),
    )
    # identical across samples: passed once and broadcast
    assert batches[0]["position_embeddings"][0].shape == (1, 5, 2)
    assert batches[0]["attention_mask"].shape == (1, 1, 5, 5)
    assert batches[0]["use_cache"] is False and batches[0]["past_key_values"] is None


def test_different_masks_are_concatenated_and_lengths_split_batches():
    a = _call(0, mask=torch.zeros(1, 1, 5, 5))
    b = _call(1, mask=torch.ones(1, 1, 5, 5))
    merged = merge_calls([a, b], batch_size=4)
    assert len(merged) == 1 and merged[0]["attention_mask"].shape == (2, 1, 5, 5)
    batches = merge_calls([_call(0, seq=5), _call(1, seq=7), _call(2, seq=7)], 4)
    assert [tuple(b["hidden_states"].shape[:2]) for b in batches] == [(1, 5), (2, 7)]
