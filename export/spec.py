"""The ONNX interface of a bundle, stated once: graph files, tensor names, dtypes, dynamic axes and
the state layout. The exporter builds the graphs from it, the validator checks them against it,
and it is written into ``manifest.json``, which is all the runtime reads (it never imports this).

Step graph (generation, one token per sequence):
    token_ids int64 [batch]  +  state.<layer>.<field> float32 [batch, size] ...
      -> logprobs float32 [batch, vocab]  +  next_state.<layer>.<field> float32 [batch, size] ...

Scoring graph (exact scoring, up to ``chunk`` steps per call):
    token_ids int64 [steps, batch], targets int64 [steps, batch], lengths int64 [batch], state...
      -> target_logprobs float32 [steps, batch]  +  next_state...
    Sequence b advances lengths[b] steps (0 <= lengths[b] <= steps); its state is frozen after that,
    and target_logprobs[t, b] for t >= lengths[b] is padding (0). So a file of any length, or a
    batch of lines of different lengths, is scored exactly by full and partial chunks. ``steps`` is
    dynamic: a call runs as many steps as its longest sequence needs, up to the manifest's ``chunk``
    (the length the graph was validated and its products measured at). In bundles exported before it
    was dynamic the manifest states the axis as the integer ``chunk``, and every call gets that many.

Advance graph (reading a prompt, up to ``advance_chunk`` steps per call; optional, absent from older bundles):
    token_ids int64 [steps, batch], lengths int64 [batch], state...  ->  next_state...
    The scoring graph's recurrence without the vocabulary projection: what reading tokens whose
    log-probabilities nobody asked for needs (the state after them). Sequence b advances lengths[b]
    steps, as in the scoring graph, so the two give the same state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FORMAT_VERSION = 1
MIN_OPSET = 17  # LayerNormalization is native from opset 17
DEFAULT_OPSET = 18
DEFAULT_CHUNK = 32
STEP_FILE, SCORE_FILE, VOCAB_FILE, MANIFEST_FILE = "step.onnx", "score.onnx", "vocab.txt", "manifest.json"
BATCH, STEPS = "batch", "steps"  # the names of the dynamic axes
ADVANCE_FILE = "advance.onnx"
DEFAULT_ADVANCE_CHUNK = 128  # measured: bench/RESULTS.md, "Reading prompts through the advance graph"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" or "float32"
    shape: tuple[str | int, ...]  # strings are dynamic axes


@dataclass(frozen=True)
class StateSpec:
    layer: int
    field: str
    size: int

    @property
    def input(self) -> str:
        return f"state.{self.layer}.{self.field}"

    @property
    def output(self) -> str:
        return f"next_state.{self.layer}.{self.field}"


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}


def _states_in(states: list[StateSpec]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.input, "float32", (BATCH, s.size)) for s in states)


def _states_out(states: list[StateSpec]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.output, "float32", (BATCH, s.size)) for s in states)


def step_graph(states: list[StateSpec], vocab_size: int, file: str = STEP_FILE) -> GraphSpec:
    return GraphSpec(
        file,
        (TensorSpec("token_ids", "int64", (BATCH,)), *_states_in(states)),
        (TensorSpec("logprobs", "float32", (BATCH, vocab_size)), *_states_out(states)),
    )


def score_graph(states: list[StateSpec], file: str = SCORE_FILE) -> GraphSpec:
    return GraphSpec(
        file,
        (
            TensorSpec("token_ids", "int64", (STEPS, BATCH)),
            TensorSpec("targets", "int64", (STEPS, BATCH)),
            TensorSpec("lengths", "int64", (BATCH,)),
            *_states_in(states),
        ),
        (TensorSpec("target_logprobs", "float32", (STEPS, BATCH)), *_states_out(states)),
    )


def advance_graph(states: list[StateSpec], file: str = ADVANCE_FILE) -> GraphSpec:
    return GraphSpec(
        file,
        (TensorSpec("token_ids", "int64", (STEPS, BATCH)), TensorSpec("lengths", "int64", (BATCH,)), *_states_in(states)),
        _states_out(states),
    )


def states_to_json(states: list[StateSpec]) -> list[dict[str, object]]:
    return [{"layer": s.layer, "field": s.field, "size": s.size, "input": s.input, "output": s.output} for s in states]
