"""Checks shared by the tests and by anyone validating trajectories of their own."""


def check_invariants(calls, segments) -> None:
    """Assert the DCPO token-exactness and exactly-once invariants for one trajectory."""
    # Each call's context, rebuilt from its segment, equals the engine's prompt.
    seg_of = {}
    for s_idx, seg in enumerate(segments):
        offset = 0
        for ci in seg.call_indices:
            seg_of[ci] = s_idx
            call = calls[ci]
            prefix_len = len(call.prompt_ids) - len(seg.prompt_ids)
            assert seg.prompt_ids + seg.response_ids[:prefix_len] == call.prompt_ids
            out = seg.response_ids[prefix_len:prefix_len + len(call.output_ids)]
            assert out == call.output_ids
            assert seg.loss_mask[prefix_len:prefix_len + len(call.output_ids)] == [1] * len(call.output_ids)
            assert seg.logprobs[prefix_len:prefix_len + len(call.output_ids)] == call.logprobs
            offset = prefix_len + len(call.output_ids)
        assert offset == len(seg.response_ids)  # a segment ends with its last call's output
        assert len(seg.response_ids) == len(seg.loss_mask) == len(seg.logprobs)
    # Loss-mask tokens of all segments are exactly the generated tokens, each once, in order.
    trained = [t for seg in segments for t, m in zip(seg.response_ids, seg.loss_mask) if m]
    generated = [t for c in calls for t in c.output_ids]
    assert trained == generated
    assert sum(sum(s.loss_mask) for s in segments) == len(generated)
    assert sorted(seg_of) == list(range(len(calls)))
    # A new segment starts exactly after each context edit: the policy's own memory action,
    # a summary, or an edit a strategy made just before the call.
    for i in range(1, len(calls)):
        starts_new = seg_of[i] != seg_of[i - 1]
        edited = calls[i - 1].kind in ("memory", "summary") or getattr(calls[i], "edited_before", False)
        assert starts_new == edited, (i, calls[i - 1].kind)
