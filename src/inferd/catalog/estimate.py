"""Memory estimates: weights from the architecture, KV cache at a profile's context and batch.

Weights are counted from the architecture (attention, MLP or experts, embeddings) rather than
taken from a declared parameter count, so a wrong architecture fact shows up as a wrong size
(tests compare every estimate with the published checkpoint). The KV cache needs, per token,
2 (K and V) x layers x KV heads x head size x bytes. A profile fits when, on each GPU (or in host
memory for CPU profiles), its share of the weights and of the KV cache for `batch` sequences of
`context` tokens, plus a fixed runtime overhead, stays within what the engine may use.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.catalog.hardware import Hardware
from inferd.catalog.schema import Architecture, ModelEntry, Profile

GiB = 2**30
# Bytes per weight. GGUF k-quants mix block types; these are their measured averages
# (the Q4_1 SmolLM2 file is 98.4 MB for 134.5M parameters: 0.73 B/param with its 8-bit
# embeddings; Q4_K_M Gemma 3 270M is 253 MB for 268M: 0.94 with its 6-bit embeddings).
BYTES_PER_WEIGHT = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    "awq": 0.5,
    "q8_0": 1.0625,
    "q4_1": 0.75,
    "q4_k_m": 0.95,
}
KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# What an engine needs beyond weights and KV cache: CUDA context, activations and CUDA graphs
# on a GPU; the Python runtime, tokenizer and compiled kernels of vLLM's CPU worker (1.3 GiB
# measured for SmolLM2) plus the API server process on a CPU.
OVERHEAD_BYTES = {"gpu": 2 * GiB, "cpu": 2 * GiB}
# Contexts tried, largest first, when the profile's own does not fit.
SMALLER_CONTEXTS = (131072, 65536, 32768, 16384, 8192, 4096, 2048)


def parameters(arch: Architecture) -> int:
    q = arch.attention_heads * arch.head_dim
    kv = arch.kv_heads * arch.head_dim
    attention = arch.hidden_size * q + 2 * arch.hidden_size * kv + q * arch.hidden_size
    matrices = 3 if arch.mlp == "gated" else 2
    mlp = matrices * arch.hidden_size * arch.intermediate_size * arch.experts
    router = arch.hidden_size * arch.experts if arch.experts > 1 else 0
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tied_embeddings else 2)
    norms = 2 * arch.hidden_size  # two per layer (pre-attention, pre-MLP); biases are ignored
    return arch.layers * (attention + mlp + router + norms) + arch.hidden_size + embeddings


def weight_bytes(arch: Architecture, precision: str) -> int:
    return int(parameters(arch) * BYTES_PER_WEIGHT[precision])


def kv_bytes_per_token(arch: Architecture, kv_precision: str) -> int:
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * KV_BYTES[kv_precision]


@dataclass(frozen=True)
class Estimate:
    """Per device (one GPU of the profile's tp x pp, or the host for CPU profiles)."""

    weights: int
    kv_cache: int
    overhead: int
    available: int
    context: int
    fits_context: int | None  # the largest tried context that fits; None if nothing does

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def fits(self) -> bool:
        return self.fits_context == self.context

    def describe(self) -> str:
        return (
            f"needs {self.total / GiB:.1f} GiB per device (weights {self.weights / GiB:.1f}, "
            f"KV cache {self.kv_cache / GiB:.1f} at {self.context} tokens, overhead "
            f"{self.overhead / GiB:.1f}); {self.available / GiB:.1f} GiB usable"
        )


def estimate(
    model: ModelEntry, profile: Profile, hw: Hardware, context: int | None = None
) -> Estimate:
    """Memory per device for `profile` on `hw`, at `context` (default: the profile's)."""
    context = context or profile.context
    device = profile.requires.device
    shards = profile.tp * profile.pp if device == "gpu" else 1
    weights = weight_bytes(model.architecture, profile.precision) // shards
    if device == "gpu":
        smallest = min((g.memory_bytes for g in hw.gpus), default=0)
        available = int(smallest * profile.gpu_memory_utilization)
    else:
        available = hw.memory_bytes
    overhead = OVERHEAD_BYTES[device]
    per_token = kv_bytes_per_token(model.architecture, profile.kv_precision)
    # vLLM's CPU build reserves a fixed KV cache (kv-cache-memory-bytes) whatever the context;
    # the context must then fit inside it.
    fixed = profile.engine_args.get("kv-cache-memory-bytes") if device == "cpu" else None
    fixed_kv = int(fixed) if fixed is not None else None

    def kv_at(ctx: int) -> int:
        return per_token * ctx * profile.batch // shards

    def fits_at(ctx: int) -> bool:
        if fixed_kv is not None:
            return kv_at(ctx) <= fixed_kv and weights + fixed_kv + overhead <= available
        return weights + kv_at(ctx) + overhead <= available

    tried = (context, *(c for c in SMALLER_CONTEXTS if c < context))
    fits_context = next((c for c in tried if fits_at(c)), None)
    kv = fixed_kv if fixed_kv is not None else kv_at(context)
    return Estimate(weights, kv, overhead, available, context, fits_context)
