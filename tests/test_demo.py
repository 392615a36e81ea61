"""`run_demo`'s second part: the feedback generator on the token task learns to keep to its rules."""

import numpy as np
import pytest

from cascade_cli import demo, sample
from cascade_cli.data import open_inputs
from cascade_cli.h5 import open_h5
from cascade_cli.model_files import load_model
from cascade_cli.options import Sampler, StopRule
from cascade_cli.run.cascade import Cascade


def followed(result, rules, steps):
    """Counts by hand the patterns whose sampled tokens are their rule from the first note, then END."""
    count = 0
    for n, t in zip(*np.nonzero(steps)):
        tokens = [int(v) for v in result.token_sequence(n, t)]
        step = {"up": 1, "down": -1, "repeat": 0}[sample.TOKEN_RULES[rules[n, t]]]
        notes = [(tokens[0] - 1 + step * j) % 6 + 1 for j in range(int(steps[n, t]) - 1)] if tokens else []
        count += tokens == notes + [0] and 1 <= tokens[0] <= 6
    return count


@pytest.mark.slow  # two trainings and two generations: about 25 s on 2 cores
def test_the_trained_feedback_generator_keeps_to_the_rules_an_untrained_one_does_not(tmp_path):
    done = demo.run_demo(demo.demo_paths(tmp_path, overwrite=False), epochs=1, say=lambda text: None)
    tokens = done.tokens
    files = {key: demo.sample_data_dir() / name for key, name in sample.TOKEN_FILE_NAMES.items()}
    with open_h5(files["tokens_inputs"]) as file:
        rules, steps = file["rules"][...], file["steps"][...]
    np.testing.assert_array_equal(tokens.steps, steps)
    assert tokens.patterns == int((steps > 0).sum())
    assert tokens.followed == followed(tokens.result, rules, steps)
    assert tokens.followed >= 0.6 * tokens.patterns
    assert tokens.starts >= 3  # it draws its own starts: not one greedy note for every pattern

    untrained = Cascade(load_model(files["tokens_model_a"]), load_model(files["tokens_model_b"]), feedback=True,
                        sampler=Sampler.categorical(), seed=0, max_steps=demo.TOKEN_DEMO_MAX_STEPS,
                        stop_rule=StopRule.token(sample.END_TOKEN))
    with open_inputs(files["tokens_inputs"]) as source:
        values, lengths, ids = untrained.run(source.read(0, source.n_samples), return_tokens=True)
    from cascade_cli.result import CascadeResult

    before = followed(CascadeResult(values.numpy(), lengths.numpy(), ids.numpy()), rules, steps)
    assert before < 0.2 * tokens.patterns
