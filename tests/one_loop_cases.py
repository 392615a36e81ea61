"""The cases `test_one_loop` pins bit for bit: every path through the packed loop, recorded from main at e4fa856.

Run as a script from the repository root to write the fixture (only from the code the fixture is to pin):

    PYTHONPATH=$PWD python tests/one_loop_cases.py

Each case builds small seeded models, runs one call (and, where it says so,
the gradient of a fixed weighting of the values under a tape) and returns a
dict of numpy arrays: values, lengths, tokens, carried states, gradients.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "one_loop_fixture.npz")
N, TA = 3, 4
STEPS = np.array([[3, 0, 2, 1], [0, 0, 0, 0], [1, 4, 0, 2]], np.int32)  # zeros, a whole zero row
MAX = 5


def _models(b="step", *, kind="gru", output_size=3, states=True, units=5):
    import builders

    a = builders.model_a("gru", ir_size=4)
    if b == "step":
        return a, builders.step_b(kind, ir_size=4, units=units, output_size=output_size)
    if b == "sequence":
        return a, builders.sequence_b(ir_size=4, units=5, output_size=output_size)
    return a, builders.feedback_b(kind, ir_size=4, units=5, output_size=output_size, states=states)


def _parts(result, prefix=""):
    names = ("values", "lengths", "tokens")
    return {prefix + name: np.asarray(part) for name, part in zip(names, result)}


def _run(settings, *, b="step", kind="gru", states=True, steps=True, grad=False, call=None, units=5):
    """Builds a cascade and runs it; `call`: extra keywords for `run`."""
    import tensorflow as tf

    from cascade_cli.run.cascade import Cascade

    a, model_b = _models(b, kind=kind, states=states, units=units)
    cascade = Cascade(a, model_b, **settings)
    x = tf.constant(np.random.default_rng(1).normal(size=(N, TA, 3)).astype("float32"))
    call = dict(call or {})
    arguments = (x, STEPS) if steps else (x,)
    if not grad:
        return _parts(cascade.run(*arguments, **call))
    weights = a.trainable_weights + model_b.trainable_weights
    with tf.GradientTape() as tape:
        result = cascade.run(*arguments, **call)
        values = result[0]
        scale = tf.reshape(tf.range(tf.size(values), dtype=values.dtype), tf.shape(values)) / 7.0 + 1.0
        loss = tf.reduce_sum(tf.sin(values) * scale)
    grads = tape.gradient(loss, weights)
    out = _parts(result)
    out["grads"] = np.concatenate([np.zeros(0, np.float32)] + [np.ravel(np.asarray(g)) for g in grads
                                                              if g is not None])
    return out


def _windows(settings, *, b="feedback", call=None):
    """One call split in two windows with the state carried: the feedback loop started from a `Carried`."""
    import tensorflow as tf

    from cascade_cli.run.cascade import Cascade

    a, model_b = _models(b)
    cascade = Cascade(a, model_b, **settings)
    x = tf.constant(np.random.default_rng(1).normal(size=(N, TA, 3)).astype("float32"))
    call = dict(call or {})
    *first, state = cascade.run(x[:, :2], STEPS[:, :2], return_state=True, **call)
    *second, state = cascade.run(x[:, 2:], STEPS[:, 2:], initial_state=state, return_state=True, **call)
    out = {**_parts(first, "w0_"), **_parts(second, "w1_")}
    for i, s in enumerate(state.b_states if hasattr(state, "b_states") else []):
        out[f"b_state{i}"] = np.asarray(s)
    return out


def _cases():
    from cascade_cli.options import Sampler, StopRule

    greedy, cat = Sampler.greedy(), Sampler.categorical(0.8, top_k=2)
    token = StopRule.token(0)
    targets = np.random.default_rng(2).normal(size=(int(STEPS.sum()), 3)).astype("float32")
    cases = {}

    def case(name, jit=(False,), settings=None, **kw):
        settings = dict(settings or {})
        if "stop_rule" in settings:  # a stop rule needs max_steps; given steps stay under it
            settings.setdefault("max_steps", MAX)
        for j in jit:
            cases[f"{name}__{'auto' if j == 'auto' else 'plain'}"] = (kw, dict(settings or {}, jit_compile=j))

    both = (False, "auto")
    # reset / carry / given steps (step-form B with states), the generic loop and the known cell
    for state in ("reset", "carry"):
        case(f"{state}_given_generic", both, settings={"state": state, "fast_cells": False}, grad=True)
        case(f"{state}_given_cell", both, settings={"state": state}, kind="lstm", grad=True)
        case(f"{state}_norm_min2", both, settings={"state": state, "fast_cells": False,
                                                 "stop_rule": StopRule.norm(0.5), "min_steps": 2}, grad=True)
        case(f"{state}_token_exclude", both, settings={"state": state, "fast_cells": False, "stop_rule": token,
                                                     "exclude_stop_step": True})
        case(f"{state}_maxsteps_norm", both, settings={"state": state, "stop_rule": StopRule.norm(0.6),
                                                     "max_steps": MAX, "min_steps": 3}, steps=False)
    case("reset_state_ir", both, settings={"state": "reset", "state_init": "ir", "fast_cells": False},
         kind="simple", units=4)
    # a sequence-form B
    case("sequence_reset", settings={"state": "reset"}, b="sequence", grad=True)
    case("sequence_reset_stop", settings={"state": "reset", "stop_rule": StopRule.norm(0.3), "min_steps": 2},
         b="sequence")
    case("sequence_carry", settings={"state": "carry"}, b="sequence")
    # feedback: samplers, stop rules, min steps, starts
    for state in ("reset", "carry"):
        case(f"fb_{state}_greedy_token", both, settings={"state": state, "feedback": True, "sampler": greedy,
                                                        "max_steps": MAX, "stop_rule": token},
             steps=False, call={"return_tokens": True})
        case(f"fb_{state}_cat_min2", both, settings={"state": state, "feedback": True, "sampler": cat, "seed": 7,
                                                    "max_steps": MAX, "stop_rule": token, "min_steps": 2},
             steps=False, call={"return_tokens": True, "sample_index": np.array([5, 9, 2**33 + 1])})
        case(f"fb_{state}_identity_norm", both, settings={"state": state, "feedback": True, "max_steps": MAX,
                                                         "stop_rule": StopRule.norm(1.0), "min_steps": 2},
             steps=False)
        case(f"fb_{state}_gate_exclude", both, settings={"state": state, "feedback": True, "max_steps": MAX,
                                                        "stop_rule": StopRule.gate(0.5),
                                                        "exclude_stop_step": True}, steps=False)
        case(f"fb_{state}_given_grad", settings={"state": state, "feedback": True}, grad=True)
        case(f"fb_{state}_previous_greedy", both, settings={"state": state, "feedback": True, "sampler": greedy,
                                                           "feedback_start": "previous", "max_steps": MAX,
                                                           "stop_rule": token}, steps=False,
             call={"return_tokens": True})
    case("fb_reset_start_token", both, settings={"feedback": True, "sampler": greedy, "feedback_start": "token:1",
                                                "max_steps": MAX, "stop_rule": StopRule.token(0, 2)},
         steps=False, call={"return_tokens": True})
    case("fb_reset_stateless", both, settings={"feedback": True, "sampler": greedy, "max_steps": MAX,
                                              "stop_rule": token}, steps=False, b="feedback_stateless",
         call={"return_tokens": True})
    case("sampler_without_feedback", both, settings={"sampler": cat, "seed": 3, "max_steps": MAX,
                                                    "stop_rule": token}, steps=False, call={"return_tokens": True})
    # teacher forcing: the known cell, the loop, scheduled sampling (its tf.cond), start "previous"
    for state in ("reset", "carry"):
        case(f"tf_{state}_cell", settings={"state": state, "feedback": True}, grad=True,
             call={"targets": targets})
        case(f"tf_{state}_loop", settings={"state": state, "feedback": True, "fast_cells": False}, grad=True,
             call={"targets": targets})
        case(f"tf_{state}_scheduled", settings={"state": state, "feedback": True, "sampler": greedy, "seed": 4},
             grad=True, call={"targets": targets, "sampling_probability": 0.5})
    case("tf_reset_previous", settings={"state": "reset", "feedback": True, "feedback_start": "previous",
                                       "fast_cells": False}, grad=True, call={"targets": targets})
    case("tf_reset_tokens", settings={"state": "reset", "feedback": True, "sampler": greedy}, grad=True,
         call={"targets": targets, "return_tokens": True})
    return cases


WINDOWS = {
    "win_carry_greedy": ({"state": "carry", "feedback": True, "sampler": "greedy", "max_steps": MAX,
                          "stop_rule": "token"}, {"return_tokens": True}),
    "win_reset_previous": ({"state": "reset", "feedback": True, "feedback_start": "previous", "sampler": "greedy",
                            "max_steps": MAX, "stop_rule": "token", "min_steps": 2}, {"return_tokens": True}),
    "win_carry_plain_norm": ({"state": "carry", "max_steps": MAX, "stop_rule": "norm", "min_steps": 2,
                              "fast_cells": False}, {}),
}


def run_window_case(name):
    from cascade_cli.options import Sampler, StopRule

    settings, call = WINDOWS[name]
    settings = dict(settings, jit_compile=False)
    settings["sampler"] = Sampler.greedy() if settings.get("sampler") == "greedy" else Sampler.identity()
    settings["stop_rule"] = StopRule.token(0) if settings["stop_rule"] == "token" else StopRule.norm(0.6)
    b = "feedback" if settings.get("feedback") else "step"
    if b == "step":
        settings.pop("sampler")
    return _windows(settings, b=b, call=call)


def case_names():
    return sorted(_cases()) + sorted(WINDOWS)


def run_case(name):
    """The named case's arrays."""
    if name in WINDOWS:
        return run_window_case(name)
    kw, settings = _cases()[name]
    kw = dict(kw)
    b = kw.pop("b", "feedback" if settings.get("feedback") else "step")
    states = True
    if b == "feedback_stateless":
        b, states = "feedback", False
    return _run(settings, b=b, states=states, **kw)


def machine():
    """The CPU model, its widest vector instructions and TensorFlow's version, the bits were recorded on: float
    kernels (oneDNN, Eigen, XLA:CPU) pick their code by the CPU's instruction set, so another CPU gives other last
    bits. The model's name alone does not tell: "AMD EPYC" is sold with and without AVX-512."""
    import tensorflow as tf

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    widest = next((flag for flag in ("avx512f", "avx2", "avx") if flag in flags), "no avx")
    return f"{model} ({widest}); tensorflow {tf.__version__}"


def main():
    arrays = {"machine": np.array(machine())}
    for name in case_names():
        for key, value in run_case(name).items():
            arrays[f"{name}/{key}"] = value
        print(name, flush=True)
    np.savez_compressed(FIXTURE, **arrays)
    print(FIXTURE, os.path.getsize(FIXTURE), "bytes")


if __name__ == "__main__":
    main()
