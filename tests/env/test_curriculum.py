"""K per prompt and step over a run (``memact.env.curriculum``)."""

import pytest

from memact.env.curriculum import Curriculum


def test_stages_split_the_run():
    c = Curriculum(objectives=3, ks=(1, 2, 4))
    assert [c.k_at(s, 6, 0, 4) for s in range(6)] == [1, 1, 2, 2, 4, 4]
    assert [c.k_at(s, 4, 0, 4) for s in range(4)] == [1, 1, 2, 4]
    assert Curriculum(objectives=3).k_at(5, 6, 0, 4) == 3


def test_mixed_rotates_k_over_prompts_and_steps():
    c = Curriculum(ks=(2, 4, 6), mode="mixed")
    assert [[c.k_at(s, 3, g, 2) for g in range(2)] for s in range(3)] == [[2, 4], [6, 2], [4, 6]]
    prompts = Curriculum(ks=(2, 4), mode="mixed").prompts(seed=0, step=0, n=4, total_steps=1)
    assert [t.k for t in prompts] == [2, 4, 2, 4] and len({t.task_id for t in prompts}) == 4


def test_a_bad_mode_is_named():
    with pytest.raises(ValueError, match="curriculum mode 'shuffled'"):
        Curriculum(mode="shuffled")
