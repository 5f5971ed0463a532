import torch

from flatquant_modifier import batching
from flatquant_modifier.batching import (
    TARGET,
    assign_steps,
    call_keys,
    equal_pairs,
    layer_input,
    merge_calls,
    plan_steps,
    pop_targets,
    share_equal_arguments,
    split_calls,
)


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


def test_the_layer_input_is_hidden_states_wherever_the_call_holds_it():
    call = _call(0)
    # a pre-hook's kwargs with the positional hidden states added last
    late = {"position_ids": torch.arange(5)[None], **call}
    key, hidden = layer_input(late)
    assert key == "hidden_states" and hidden is call["hidden_states"]
    # other layers: their first tensor argument
    assert layer_input({"flag": True, "x": call["hidden_states"]})[0] == "x"
    # the steps take the tokens of the hidden states, not of position_ids
    calls = [{"position_ids": torch.arange(5)[None], **_call(i)} for i in range(4)]
    steps = plan_steps(calls, *assign_steps(call_keys(calls), 2))
    assert [tuple(layer_input(k)[1].shape) for b in steps for k in b] == [(2, 5, 4)] * 2


def test_different_masks_are_concatenated_and_lengths_split_batches():
    a = _call(0, mask=torch.zeros(1, 1, 5, 5))
    b = _call(1, mask=torch.ones(1, 1, 5, 5))
    merged = merge_calls([a, b], batch_size=4)
    assert len(merged) == 1 and merged[0]["attention_mask"].shape == (2, 1, 5, 5)
    batches = merge_calls([_call(0, seq=5), _call(1, seq=7), _call(2, seq=7)], 4)
    assert [tuple(b["hidden_states"].shape[:2]) for b in batches] == [(1, 5), (2, 7)]


def test_calls_of_several_samples_concatenate_their_per_sample_arguments():
    # oneshot(batch_size=2): every call holds 2 samples and its own copy of the
    # (identical) mask and rotary embeddings, shaped by that batch
    def pair(seed):
        g = torch.Generator().manual_seed(seed)
        return {"hidden_states": torch.randn(2, 5, 4, generator=g),
                "position_embeddings": (torch.ones(2, 5, 2), torch.zeros(2, 5, 2)),
                "attention_mask": torch.zeros(2, 1, 5, 5), "cache_position": torch.arange(5)}

    merged = merge_calls([pair(0), pair(1)], batch_size=2)[0]
    assert merged["hidden_states"].shape == (4, 5, 4)
    assert merged["attention_mask"].shape == (4, 1, 5, 5)
    assert merged["position_embeddings"][0].shape == (4, 5, 2)
    assert merged["cache_position"].shape == (5,)  # no batch dimension: passed once


def test_steps_follow_the_content_not_the_arrival_order_nor_the_sharding():
    calls = [_call(i) for i in range(8)]
    steps, num_steps = assign_steps(call_keys(calls), batch_size=4)
    assert num_steps == 2 and sorted(steps) == [0, 0, 0, 0, 1, 1, 1, 1]
    reversed_steps, _ = assign_steps(call_keys(calls[::-1]), batch_size=4)
    assert reversed_steps == steps[::-1]
    planned = plan_steps(calls, steps, num_steps)
    assert [len(step) for step in planned] == [1, 1]
    members = [i for i in range(8) if steps[i] == 1]
    torch.testing.assert_close(
        planned[1][0]["hidden_states"],
        torch.cat([calls[i]["hidden_states"] for i in members]),
    )


def test_steps_split_by_shape_and_may_be_empty():
    calls = [_call(0, seq=5), _call(1, seq=7), _call(2, seq=7)]
    planned = plan_steps(calls, [0, 0, 0], num_steps=2)
    assert [tuple(b["hidden_states"].shape[:2]) for b in planned[0]] == [(1, 5), (2, 7)]
    assert planned[1] == []


def test_samples_shared_by_ranks_are_reported(capsys):
    from flatquant_modifier.batching import _warn_on_shared_samples
    from tests.helpers import log_messages

    with log_messages() as messages:
        _warn_on_shared_samples([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
        assert not messages
        _warn_on_shared_samples([torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])])
    assert len(messages) == 1 and "shard_dataset" in messages[0]



def test_calls_of_several_samples_split_into_the_calls_of_one_sample():
    # what oneshot(batch_size=2) caches, back to what batch_size=1 caches
    singles = [_call(i) for i in range(4)]
    pairs = merge_calls(singles, batch_size=2)
    pairs[0]["cache_position"] = torch.arange(5)  # no batch dimension: shared
    split = split_calls(pairs)
    assert len(split) == 4
    for ours, single in zip(split, singles):
        torch.testing.assert_close(ours["hidden_states"], single["hidden_states"])
        assert ours["position_embeddings"][0].shape == (1, 5, 2)
        assert ours["attention_mask"].shape == (1, 1, 5, 5)
    assert split[1]["cache_position"] is pairs[0]["cache_position"]
    torch.testing.assert_close(call_keys(split), call_keys(singles))


def test_equal_arguments_are_shared_and_compared_once_per_tensor(monkeypatch):
    # two calibration batches of 3 samples each: their rotary embeddings are equal
    # tensors, not the same objects; every sample has its own hidden states
    calls = split_calls([merge_calls([_call(3 * b + i) for i in range(3)], 3)[0]
                         for b in range(2)])
    assert calls[0]["position_embeddings"][0] is not calls[3]["position_embeddings"][0]
    batches, equals = [], []
    original_pairs, original_equal = batching.equal_pairs, torch.equal
    monkeypatch.setattr(batching, "equal_pairs",
                        lambda pairs: batches.append(len(pairs)) or original_pairs(pairs))
    monkeypatch.setattr(torch, "equal", lambda a, b: equals.append(1) or original_equal(a, b))
    shared = share_equal_arguments(calls)
    # one batch of comparisons: a pair per distinct tensor after the first (rotary
    # cos and sin, the mask), no torch.equal (a host sync each on a GPU)
    assert batches == [3] and equals == []
    assert all(c["position_embeddings"][0] is shared[0]["position_embeddings"][0]
               for c in shared)
    assert all(c["hidden_states"] is o["hidden_states"] for c, o in zip(shared, calls))
    batches.clear()
    planned = plan_steps(calls, [0, 0, 1, 1, 0, 1], 2)
    assert batches == [3] and equals == []  # merging compares by identity only
    assert [b["hidden_states"].shape[0] for step in planned for b in step] == [3, 3]
    assert planned[0][0]["attention_mask"].shape == (1, 1, 5, 5)


def test_equal_pairs_agrees_with_torch_equal():
    base = torch.arange(12.0).reshape(3, 4)
    nan = torch.tensor([1.0, float("nan")])
    pairs = [
        (base.clone(), base),  # equal values, other memory
        (base + 1, base),  # different values
        (base[0], base[0].view(4)),  # the same memory: equal without comparing
        (base[0], base[1]),  # views of one tensor at other offsets
        (nan.clone(), nan),  # NaN is not equal to NaN
        (torch.zeros(0, 4), torch.zeros(0, 4)),
        (torch.tensor([True, False]), torch.tensor([True, True])),
    ]
    assert equal_pairs(pairs) == [torch.equal(a, b) for a, b in pairs[:4]] + [
        False, True, False]
    assert equal_pairs([]) == []


def test_different_arguments_stay_apart_and_equal_samples_stay_two_samples():
    a, b = _call(0, mask=torch.zeros(1, 1, 5, 5)), _call(1, mask=torch.ones(1, 1, 5, 5))
    shared = share_equal_arguments([a, b])
    assert shared[1]["attention_mask"] is b["attention_mask"]
    merged = merge_calls(shared, batch_size=2)[0]
    assert merged["attention_mask"].shape == (2, 1, 5, 5)
    # a sample given twice is trained on twice: the layer input is never broadcast
    twice = merge_calls([a, {**a, "hidden_states": a["hidden_states"].clone()}], 2)[0]
    assert twice["hidden_states"].shape == (2, 5, 4)


def test_named_tuple_arguments_survive_sharing():
    from collections import namedtuple

    Pair = namedtuple("Pair", "cos sin")
    calls = [{**_call(i), "position_embeddings": Pair(torch.ones(1, 5, 2), torch.zeros(1, 5, 2))}
             for i in range(2)]
    shared = share_equal_arguments(calls)
    assert shared[0]["position_embeddings"] is calls[0]["position_embeddings"]
    assert isinstance(shared[1]["position_embeddings"], Pair)
    assert shared[1]["position_embeddings"].cos is calls[0]["position_embeddings"].cos


def test_recorded_outputs_follow_their_samples_into_the_steps():
    # oneshot batches of 2 samples carrying the layer's outputs; samples 1 and 3 are
    # equal, their outputs not: each keeps its own output, in its step and sub-batch
    singles = [_call(i) for i in (0, 1, 2, 1)]
    for i, call in enumerate(singles):
        call[TARGET] = call["hidden_states"] * 10 + i
    pairs = merge_calls(singles, batch_size=2)
    assert pairs[0][TARGET].shape == (2, 5, 4)
    calls = split_calls(pairs)
    steps, targets = pop_targets(plan_steps(calls, [0, 1, 0, 1], 2))
    assert all(TARGET not in kwargs for batches in steps for kwargs in batches)
    offsets = [[(target - 10 * kwargs["hidden_states"]).mean(dim=(1, 2))
                for kwargs, target in zip(batches, step_targets)]
               for batches, step_targets in zip(steps, targets)]
    torch.testing.assert_close(offsets, [[torch.tensor([0.0, 2.0])],
                                         [torch.tensor([1.0, 3.0])]])
    # a sub-batch without one: none are used
    del calls[3][TARGET]
    _, targets = pop_targets(plan_steps(calls, [0, 1, 0, 1], 2))
    assert targets is None
