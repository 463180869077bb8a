"""The memory plan: each stage's estimated peak memory, by part, from the model's shape and the stage's work, and
the training settings (micro-batch, accumulation, gradient checkpointing, 4-bit base) that fit a GPU.

The estimate counts the tensors medko's code keeps, read from that code: autograd's saved tensors per decoder layer
(engine.model, engine.adapters' LoRA), the chunked head's buffers (engine.losses), the teacher's hidden states
(engine.adapters.teacher_states), the KV cache (engine.generate). Two devices differ in more than width:

- cuda: bf16 weights under autocast. Gemma's RMSNorm saves a float32 copy of its input; LoRA saves a bf16 copy of
  its float32-cast input; SDPA gets a boolean mask with grouped-query heads, which rules out the flash and
  memory-efficient kernels, so its math path runs in float32 and saves [batch, heads, T, T] probabilities.
- cpu: float32 everywhere; SDPA's CPU flash kernel saves no [T, T] tensor. A CPU peak is resident memory, which
  holds more than the live tensors: glibc's malloc raises its mmap threshold to the largest block freed (up to
  32 MiB), so [tokens x width] tensors come from its heaps, where the forward's freed intermediates (norm and RoPE
  temporaries) leave holes that stay resident. Training adds CPU_HEAP_RETENTION of the kept activations and
  CPU_RUNTIME for that, both measured on this project's CPU (bench/plan_check.py); under
  MALLOC_MMAP_THRESHOLD_=65536 the retention is gone and the live-tensor estimate holds alone.

With --nproc N the sharded parts are divided as FSDP2 would: base weights, trainable weights, gradients and AdamW
states by N; activations, the teacher pass and evaluation stay per rank, and each rank holds the embedding and
FSDP_LAYERS decoder layers gathered whole while it computes (measured on CPU ranks by tests/test_shard_load.py).
At load a rank holds its shard of the base (engine.shard_load reads nothing else) plus the additions whole before
they are sharded. NF4 is not planned with N > 1: FSDP2 cannot shard it and medko refuses the combination. Every
rank runs the whole evaluation and generation batch (a sharded model needs the same forward passes everywhere), so
their rows are cut, as on one GPU, to what fits beside this rank's base and gathered layers (rows_within here; at
run time engine.fit.rows_that_fit, which the ranks agree on).

Imports engine.checkpoints, engine.errors and engine.model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from engine.checkpoints import read_config, resolve_model_dir
from engine.errors import MedkoError, log
from engine.model import PRESETS, ModelConfig, resolve_device

GIB = 2 ** 30
CUDA_CONTEXT = 1 * GIB  # the CUDA context and cuBLAS workspaces, outside PyTorch's allocator
CUDA_SLACK = 0.05  # share of the GPU the caching allocator's fragmentation may take
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64 weights, an fp32 one per 256 absmax
EVAL_ROWS = 16  # engine.evaluate's default batch of questions
GPU_MEMORY_ENV = "MEDKO_GPU_MEMORY_GIB"  # GiB of GPU memory to plan for, in place of torch.cuda's (gpu_memory)
CPU_HEAP_RETENTION = 0.45  # glibc heap kept resident in a CPU training step, per byte of kept activations (measured)
CPU_RUNTIME = 96 * 2 ** 20  # a CPU training step's fixed resident growth: threads, oneDNN's kernels (measured)
MEASURE_ROWS = 16  # engine.measures' held-out texts per forward (its batch_size)
DRIFT_POSITIONS = 16  # engine.measures' drift positions per text
DRIFT_CHUNK = 128  # engine.measures' drift positions whose [vocab] rows are alive at once
FSDP_LAYERS = 2  # decoder layers an FSDP2 rank holds whole in a step: the one computing and one all-gather buffer
# (engine.distributed unshards as an async op; tests/test_shard_load.py measures 2.4 with the step's own memory)


@dataclass(frozen=True)
class StageWork:
    """What one stage holds in memory."""

    name: str  # the stage's short name (s1, s1_1, ...), or "test" for the test split
    title: str  # how the plan prints it
    trains: bool  # runs training steps
    lora: bool = False  # lora1 trains (or, in a stage that does not train, is held)
    language: bool = False  # language vectors exist and train; they make every layer's activations need gradients
    edge_layers: bool = False  # the two duplicated edge layers exist, dense and trainable
    english: bool = False  # the per-layer English loss: a student English graph and a teacher pass per micro-batch
    generate: tuple[int, int] = (0, 0)  # greedy generation the stage runs: (most rows at once, most new tokens)
    measures: bool = True  # held-out losses and drift (engine.measures) before and after


# The curriculum's stages as memory sees them (shared_logic's stage table and stage scripts); s3-s5 keep lora1's
# frozen teacher snapshot when s1.1 ran, counted here as if it had.
STAGE_WORK = (
    StageWork("s1", "s1 gate eval", False, generate=(16, 512), measures=False),  # translation, 2x a line + 16 tokens
    StageWork("s1_1", "s1.1 english", True, lora=True),
    StageWork("s2", "s2 embed", True, language=True),
    StageWork("s3", "s3 korean", True, lora=True, language=True, english=True),
    StageWork("s4", "s4 translate", True, lora=True, language=True, edge_layers=True, english=True, generate=(32, 96)),
    StageWork("s5", "s5 reasoning", True, lora=True, language=True, edge_layers=True, english=True,
              generate=(64, 256)),
    StageWork("test", "test scoring", False, lora=True, language=True, edge_layers=True),
    StageWork("sft", "lora-sft baseline", True, lora=True, generate=(64, 256)),  # run.sh --recipe lora-sft
)
WORK = {w.name: w for w in STAGE_WORK}


@dataclass(frozen=True)
class Setup:
    """Where and how a stage runs."""

    device: str = "cuda"  # "cuda" (bf16 weights, autocast) or "cpu" (float32)
    batch: int = 8  # examples per micro-batch, each up to max_len tokens
    max_len: int = 512  # tokens per example and per evaluated prompt
    lora_rank: int = 16  # rank of lora1
    checkpointing: bool = False  # recompute each decoder layer in backward
    quantize: bool = False  # NF4 base projections (--quantize 4bit, CUDA only)
    nproc: int = 1  # processes the sharded parts are divided across

    @property
    def width(self) -> int:
        """Bytes per element of weights and activations."""
        return 2 if self.device == "cuda" else 4


@dataclass(frozen=True)
class Estimate:
    """Estimated peak bytes of one stage, by part."""

    base: int  # frozen base weights (this rank's shard)
    trainable: int  # trainable weights, their gradients and AdamW's two states (this rank's shard)
    activations: int  # what one micro-batch's autograd graphs keep until the backward, with the setup's checkpointing
    transient: int  # the largest working memory beside them: the head's slices or the backward's gradients
    teacher: int  # the teacher's kept hidden states and its forward's working memory (not alive in the backward)
    evaluation: int  # the largest of logits scoring, held-out measures and generation with its KV cache
    weights_only: int  # trainable weights alone (what evaluation holds besides the base)
    load: int  # the peak while the model loads: the base (this rank's shard), the additions whole, a tensor in flight
    allocator: int = 0  # on a CPU, what glibc's heaps and the runtime keep resident beyond the tensors in training
    eval_rows: dict[str, int] = field(default_factory=dict)  # rows at once of each evaluation (logits, measures, ...)

    @property
    def training(self) -> int:
        return self.base + self.trainable + self.activations + max(self.transient, self.teacher) + self.allocator

    @property
    def peak(self) -> int:
        return max(self.training, self.base + self.weights_only + self.evaluation)


def layer_params(c: ModelConfig) -> int:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return 2 * c.hidden_size * (q + kv) + 3 * c.hidden_size * c.intermediate_size + 4 * c.hidden_size + 2 * c.head_dim


def projection_params(c: ModelConfig) -> int:
    """Weights of one layer's seven projections (what LoRA wraps and NF4 quantizes)."""
    return layer_params(c) - 4 * c.hidden_size - 2 * c.head_dim


def base_params(c: ModelConfig) -> int:
    """Parameters of the model as loaded: the tied embedding, the layers and the final norm."""
    return c.vocab_size * c.hidden_size + c.num_layers * layer_params(c) + c.hidden_size


def base_bytes(c: ModelConfig, s: Setup) -> int:
    if not s.quantize:
        return base_params(c) * s.width
    dense = base_params(c) - c.num_layers * projection_params(c)
    return int(dense * s.width + c.num_layers * projection_params(c) * NF4_BYTES)


def lora_params(c: ModelConfig, rank: int, layers: int) -> int:
    """A [rank, in] and B [out, rank] on each of a layer's seven projections."""
    q, kv, h, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    return rank * (2 * (h + q) + 2 * (h + kv) + 3 * (h + i)) * layers


def trainable_bytes(c: ModelConfig, w: StageWork, s: Setup) -> tuple[int, int]:
    """(weights, weights + gradients + AdamW states) of what the stage trains. LoRA and language vectors are
    float32 master weights; duplicated layers are in the weights' dtype. Gradients and torch's AdamW states take
    their parameter's dtype. A stage that does not train holds its additions as weights only."""
    layers = c.num_layers + (2 if w.edge_layers else 0)
    fp32 = (lora_params(c, s.lora_rank, layers) if w.lora else 0) + (2 * c.hidden_size if w.language else 0)
    dense = 2 * layer_params(c) * s.width if w.edge_layers else 0
    weights = fp32 * 4 + dense
    return weights, weights * (4 if w.trains else 1)


def layer_saved(c: ModelConfig, s: Setup, rows: int, tokens: int) -> int:
    """Bytes autograd keeps for one decoder layer's backward over rows x tokens, LoRA on every projection (in s2
    too, where lora1 is frozen when s1.1 made it: its inputs need gradients all the same)."""
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    n = rows * tokens
    lora = 7 * s.lora_rank * 4 * n  # each adapter's [n, rank] middle
    if s.device == "cuda":
        norms = 4 * (4 * h + q + kv)  # float32 copies of the inputs of four RMSNorms and the q/k norms
        adapters = 2 * (5 * h + q + i)  # bf16 casts of each projection's input
        attention = 2 * (q + 2 * kv) + 12 * q  # q, k, v; their float32, head-repeated copies in the math path
        mlp = 2 * 3 * i  # gate (gelu's input), gelu's output, up
        probs = 4 * rows * c.num_heads * tokens * tokens
        return n * (norms + adapters + attention + mlp) + probs + lora
    # cpu float32: the layer input and its norm's output, q and k before their norms, SDPA's q, k, v and output,
    # o_proj's output, the residual after attention and its norm's output, four MLP tensors and down's output.
    return 4 * n * (6 * h + 3 * q + 3 * kv + 4 * i) + lora


def layer_working(c: ModelConfig, s: Setup, rows: int, tokens: int) -> int:
    """Bytes alive at once inside one decoder layer's forward without gradients (inference, the teacher)."""
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    n, e = rows * tokens, s.width
    attention = e * n * 2 * (q + 2 * kv)
    if s.device == "cuda":  # math path: float32 q, repeated k and v, scores and probabilities
        attention += 4 * n * 3 * q + 2 * 4 * rows * c.num_heads * tokens * tokens
    return e * n * 2 * h + max(attention, e * n * 3 * i) + 4 * n * h


def head_buffers(c: ModelConfig, s: Setup, targets: int) -> tuple[int, int]:
    """engine.losses.ChunkedCrossEntropy: (the hidden-state gradient it keeps, its working memory: float32
    accumulators over a chunk of rows and one slice of logits)."""
    rows = min(targets, 8192)
    slice_floats = (1 << 22) if s.device == "cpu" else (1 << 26)
    return targets * c.hidden_size * s.width, 3 * 4 * rows * c.hidden_size + slice_floats * (4 + s.width)


def graph_bytes(c: ModelConfig, s: Setup, layers: int) -> int:
    """One micro-batch's forward graph through `layers` layers; with checkpointing each layer keeps its input and
    one layer's graph is rebuilt at a time in the backward."""
    n = s.batch * s.max_len
    per_layer = layer_saved(c, s, s.batch, s.max_len)
    if s.checkpointing:
        return layers * n * c.hidden_size * s.width + per_layer
    return layers * per_layer


def activation_bytes(c: ModelConfig, w: StageWork, s: Setup) -> tuple[int, int]:
    """(kept, transient): the stage's graph with its head's gradient, and in s3-s5 the English student graph with
    its hidden states and the per-layer loss, all kept until the backward; and the largest working memory beside
    them, the head's walk or the backward's gradients of one layer's widest tensors."""
    layers = c.num_layers + (2 if w.edge_layers else 0)
    n = s.batch * s.max_len
    head_kept, head_walk = head_buffers(c, s, n)
    kept = graph_bytes(c, s, layers) + head_kept + 2 * n * c.hidden_size * s.width
    if w.english:
        # every student hidden state kept; the MSE keeps a float32 copy and a difference per teacher state
        kept += graph_bytes(c, s, layers) + (layers + 1) * n * c.hidden_size * s.width
        kept += (c.num_layers + 1) * 2 * 4 * n * c.hidden_size
    return kept, max(head_walk, s.width * n * 2 * (c.intermediate_size + c.hidden_size))


def teacher_bytes(c: ModelConfig, w: StageWork, s: Setup) -> int:
    """engine.adapters.teacher_states: every original layer's hidden state of the English micro-batch, the working
    memory of one layer's forward, and lora1's frozen snapshot."""
    if not w.english:
        return 0
    n = s.batch * s.max_len
    return ((c.num_layers + 1) * n * c.hidden_size * s.width + layer_working(c, s, s.batch, s.max_len)
            + lora_params(c, s.lora_rank, c.num_layers) * 4)


def kv_cache_bytes(c: ModelConfig, s: Setup, rows: int, tokens: int, layers: int) -> int:
    return 2 * layers * rows * tokens * c.num_kv_heads * c.head_dim * s.width


def logits_scoring_bytes(c: ModelConfig, s: Setup, rows: int = EVAL_ROWS) -> int:
    """engine.evaluate.letter_scores: one forward of `rows` prompts of max_len without gradients; five logits each."""
    return layer_working(c, s, rows, s.max_len) + rows * s.max_len * c.hidden_size * s.width


def evaluation_bytes(c: ModelConfig, s: Setup, kind: str, rows: int, new_tokens: int = 0, layers: int = 0) -> int:
    """Working memory of `rows` at once of one evaluation, prompts of max_len, through `layers` (default c's):
    "logits" (letter scoring), "measures" (engine.measures: the student's and teacher's hidden states and the
    drift's [vocab] rows) or "generate", whose prefill cache is still held when the joined cache with room for the
    new tokens is made (engine.generate._join)."""
    v, h, e, n = c.vocab_size, c.hidden_size, s.width, rows * s.max_len
    if kind == "logits":
        return logits_scoring_bytes(c, s, rows)
    if kind == "measures":
        return layer_working(c, s, rows, s.max_len) + 3 * n * h * e + 5 * min(rows * DRIFT_POSITIONS, DRIFT_CHUNK) * v * 4
    layers = layers or c.num_layers
    cache = kv_cache_bytes(c, s, rows, s.max_len, layers) + kv_cache_bytes(c, s, rows, s.max_len + new_tokens, layers)
    return cache + layer_working(c, s, rows, s.max_len) + rows * v * 4


def rows_within(c: ModelConfig, s: Setup, kind: str, wanted: int, budget: int | None, new_tokens: int = 0,
                layers: int = 0) -> int:
    """The most rows, `wanted` halved until they fit, whose evaluation fits `budget` bytes (None: no limit); at
    least one: a single row that does not fit is the caller's to refuse."""
    rows = wanted
    while budget is not None and rows > 1 and evaluation_bytes(c, s, kind, rows, new_tokens, layers) > budget:
        rows //= 2
    return rows


def evaluation_parts(c: ModelConfig, w: StageWork, s: Setup, budget: int | None = None) -> dict[str, tuple[int, int]]:
    """(rows at once, bytes) of each evaluation the stage runs: logits scoring, held-out measures and generation,
    each at its default rows, halved while it passes `budget` (what the GPU leaves beside the base and the
    stage's weights), as engine.generate, engine.evaluate and engine.measures size their batches on CUDA."""
    layers = c.num_layers + (2 if w.edge_layers else 0)
    wanted = {"logits": (EVAL_ROWS, 0), "measures": (MEASURE_ROWS, 0) if w.measures else (0, 0), "generate": w.generate}
    parts = {}
    for kind, (rows, new) in wanted.items():
        if rows:
            rows = rows_within(c, s, kind, rows, budget, new, layers)
            parts[kind] = (rows, evaluation_bytes(c, s, kind, rows, new, layers))
    return parts


def gathered_bytes(c: ModelConfig, s: Setup) -> int:
    """What an FSDP2 rank holds whole beside its shard while it computes: the embedding and FSDP_LAYERS decoder
    layers."""
    return (c.vocab_size * c.hidden_size + FSDP_LAYERS * layer_params(c)) * s.width


def estimate(c: ModelConfig, w: StageWork, s: Setup, gpu_bytes: int | None = None) -> Estimate:
    """One stage's estimated peak, by part, for this rank; given the GPU's bytes, each evaluation at the rows that
    fit beside the base and the stage's weights."""
    weights, trainable = trainable_bytes(c, w, s)
    base = base_bytes(c, s)
    load = base + weights
    if s.nproc > 1:
        load = base // s.nproc + weights + layer_params(c) * s.width // s.nproc
        base, trainable, weights = base // s.nproc + gathered_bytes(c, s), trainable // s.nproc, weights // s.nproc
    kept, transient = activation_bytes(c, w, s) if w.trains else (0, 0)
    allocator = int(CPU_HEAP_RETENTION * kept) + CPU_RUNTIME if s.device == "cpu" and w.trains else 0
    budget = None if gpu_bytes is None else usable_bytes(gpu_bytes) - base - weights
    parts = evaluation_parts(c, w, s, budget)
    return Estimate(base=base, trainable=trainable, activations=kept, transient=transient,
                    teacher=teacher_bytes(c, w, s) if w.trains else 0,
                    evaluation=max(b for _, b in parts.values()), weights_only=weights, load=load,
                    allocator=allocator, eval_rows={kind: rows for kind, (rows, _) in parts.items()})


def usable_bytes(gpu_bytes: int) -> int:
    """What PyTorch's tensors may take of a GPU: less the CUDA context and the allocator's slack."""
    return int(gpu_bytes * (1 - CUDA_SLACK)) - CUDA_CONTEXT


def candidates(batch: int, quantize_choices: tuple[bool, ...]):
    """Settings in the order of preference: full precision first, the largest micro-batch first, and at each
    micro-batch without checkpointing before with it; the global batch stays batch x accumulation."""
    for quantize in quantize_choices:
        size = batch
        while size >= 1:
            for checkpointing in (False, True):
                yield size, -(-batch // size), checkpointing, quantize
            size //= 2


@dataclass(frozen=True)
class Fit:
    batch: int  # examples per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    checkpointing: bool
    quantize: bool
    estimate: Estimate


def fitting_settings(c: ModelConfig, w: StageWork, s: Setup, gpu_bytes: int, allow_quantize: bool = True,
                     part: str = "peak") -> Fit | None:
    """The first candidate setting whose estimated peak (or, with part="training", training peak) fits the GPU."""
    limit = usable_bytes(gpu_bytes)
    nf4 = allow_quantize and s.device == "cuda" and not s.quantize and s.nproc == 1  # FSDP2 cannot shard NF4
    for batch, accum, checkpointing, quantize in candidates(s.batch, (False, True) if nf4 else (s.quantize,)):
        found = estimate(c, w, replace(s, batch=batch, checkpointing=checkpointing, quantize=quantize), gpu_bytes)
        if getattr(found, part) <= limit:
            return Fit(batch, accum, checkpointing, quantize, found)
    return None


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def plan_table(c: ModelConfig, s: Setup, gpu_bytes: int, name: str = "") -> str:
    """The printed plan: per stage the parts of its peak at the default micro-batch, and the settings that fit."""
    header = (f"memory plan for {name or 'the model'}: {c.num_layers} layers, hidden {c.hidden_size}, "
              f"{base_params(c) / 1e9:.2f}B parameters; {s.device}, "
              f"{'bf16' if s.width == 2 else 'float32'} weights{', NF4 base' if s.quantize else ''}, "
              f"{s.nproc} process{'es' if s.nproc > 1 else ''}")
    shape = (f"micro-batch {s.batch} x {s.max_len} tokens, LoRA rank {s.lora_rank}; GPU {gpu_bytes / GIB:.0f} GiB, "
             f"{_gib(usable_bytes(gpu_bytes))} GiB usable (less {_gib(CUDA_CONTEXT)} GiB CUDA context and "
             f"{CUDA_SLACK:.0%} allocator slack); GiB per rank")
    columns = (f"{'stage':<18}{'load':>7}{'base':>7}{'train+opt':>10}{'act':>8}{'act ckpt':>9}{'teacher':>8}"
               f"{'eval':>7}{'peak':>8}  fits with")
    lines = [header, shape, columns]
    for w in STAGE_WORK:
        plain = estimate(c, w, replace(s, checkpointing=False))
        ckpt = estimate(c, w, replace(s, checkpointing=True))
        fit = fitting_settings(c, w, s, gpu_bytes)
        if fit is None:
            how = "nothing: use more GPUs (--nproc) or a larger GPU"
        else:
            nf4 = ", NF4 base (chosen: bf16 does not fit)" if fit.quantize and not s.quantize else ""
            rows = "".join(f", {kind} {n} rows" for kind, n in fit.estimate.eval_rows.items()
                           if n < plain.eval_rows.get(kind, n))
            how = "as is" if not w.trains else (f"micro-batch {fit.batch}, accumulation {fit.grad_accum}, "
                                                f"checkpointing {'on' if fit.checkpointing else 'off'}")
            how += f"{nf4}{rows} ({_gib(fit.estimate.peak)})"
        act = _gib(plain.activations + plain.transient) if w.trains else "-"
        act_ckpt = _gib(ckpt.activations + ckpt.transient) if w.trains else "-"
        lines.append(f"{w.title:<18}{_gib(plain.load):>7}{_gib(plain.base):>7}{_gib(plain.trainable):>10}{act:>8}"
                     f"{act_ckpt:>9}{_gib(plain.teacher):>8}{_gib(plain.evaluation):>7}{_gib(plain.peak):>8}  {how}")
    lines.append("trainable weights are float32 (LoRA, language vectors) or the weights' dtype (duplicated layers); "
                 "gradients and AdamW's two states take their dtype. peak = base + the larger of training "
                 "(train+opt + act, with the teacher pass in place of act's transient part when larger) and eval, "
                 "without checkpointing, eval at its default rows (logits 16, measures 16, generation s1 16, s4 32, "
                 "s5 64); 'fits with' names the rows an evaluation is cut to"
                 + ("; on cpu training adds glibc's retained heap and the runtime (CPU_HEAP_RETENTION, CPU_RUNTIME)"
                    if s.device == "cpu" else ""))
    if s.nproc > 1:
        lines.append(f"per rank under FSDP2: load = the rank's shard of the base (each rank reads only its rows) and "
                     f"the additions whole before they are sharded; base = the shard plus the embedding and "
                     f"{FSDP_LAYERS} decoder layers gathered whole while computing; every rank runs the whole "
                     f"generation batch. NF4 (--quantize 4bit) is refused with --nproc > 1: FSDP2 cannot shard it")
    return "\n".join(lines)


def auto_settings(c: ModelConfig, stage: str, s: Setup, gpu_bytes: int) -> Fit:
    """The plan's training settings for a stage on a GPU, logged; a stage whose training fits nothing is refused in
    one sentence, and one whose evaluation alone overflows is warned about."""
    fit = fitting_settings(c, WORK[stage], s, gpu_bytes, allow_quantize=False, part="training")
    quantized = fitting_settings(c, WORK[stage], s, gpu_bytes)
    hint = ("pass --quantize 4bit" if quantized and quantized.quantize and not s.quantize
            else "use more GPUs or a larger one")
    if fit is None:
        raise MedkoError(f"{stage} does not fit {gpu_bytes / GIB:.0f} GiB by the memory plan even at micro-batch 1 "
                         f"with checkpointing; {hint}, or give --batch-size to override the plan")
    log.info("memory plan for %s: micro-batch %d, accumulation %d, checkpointing %s, estimated training peak %s of "
             "%s GiB (python medko.py plan shows the parts; --batch-size, --grad-accum or --gradient-checkpointing "
             "override it)", stage, fit.batch, fit.grad_accum, "on" if fit.checkpointing else "off",
             _gib(fit.estimate.training), _gib(gpu_bytes))
    if fit.estimate.peak > usable_bytes(gpu_bytes):
        log.warning("memory plan: %s's evaluation is estimated at %s GiB with the base even one row at a time, "
                    "beyond this GPU; %s", stage, _gib(fit.estimate.peak), hint)
    return fit


def gpu_memory(device: torch.device | str) -> int | None:
    """Bytes of GPU memory to plan for: MEDKO_GPU_MEMORY_GIB when set (a share of a GPU, or a smaller GPU
    simulated, e.g. on a CPU in the tests), else torch.cuda's total on a CUDA device, else None (nothing to fit)."""
    value = os.environ.get(GPU_MEMORY_ENV)
    if value:
        try:
            return int(float(value) * GIB)
        except ValueError:
            raise MedkoError(f"{GPU_MEMORY_ENV}={value!r} is not a number of GiB; set it to e.g. 24 or unset "
                             f"it") from None
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def stage_settings(stage: str, size: str, model_dir: str | None, device: str | None, batch: int, max_len: int,
                   lora_rank: int, quantize: bool) -> tuple[int, int, bool]:
    """(micro-batch, accumulation, checkpointing) of a training stage: on CUDA the plan's for this GPU and the
    processes torchrun starts (WORLD_SIZE), logged; elsewhere the default micro-batch as it is."""
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return batch, 1, False
    config = read_config(resolve_model_dir(size, model_dir)) if model_dir else PRESETS[size]
    setup = Setup("cuda", batch, max_len, lora_rank, quantize=quantize, nproc=int(os.environ.get("WORLD_SIZE", "1")))
    fit = auto_settings(config, stage, setup, gpu_memory(resolved))
    return fit.batch, fit.grad_accum, fit.checkpointing

