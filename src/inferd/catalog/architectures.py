"""Which model architectures each engine serves, for models given by path (`catalog.local_model`).

One table per question, kept here so the answer is in one place:

- `VLLM_TEXT_GENERATION`: the `architectures` names of config.json that vLLM 0.32 serves for text
  generation (the keys of its `_TEXT_GENERATION_MODELS`). A static copy because asking vLLM
  itself (`vllm.model_executor.models.ModelRegistry`) imports torch and vLLM: 25 s on the
  project's 2-core machine, which `inferd profiles PATH` must not pay; a unit test reads vLLM's
  registry source and fails when the two differ, so an upgrade cannot leave it stale.
- llama.cpp: the `general.architecture` names of the `gguf` package installed with inferd
  (llama.cpp's own Python package, kept in step with its C++ loader), minus those that are not
  text generators (`NOT_GENERATIVE`: vision projectors, encoders, embedding models).
- `GGUF_TO_HF`: GGUF architectures that transformers can de-quantize into a Hugging Face
  checkpoint (`cache.convert`), with the class name the converted config.json then carries: the
  GGUF files that also get vLLM profiles. Checked against transformers' own list by a test.

There is no converter the other way (safetensors -> GGUF needs llama.cpp's convert_hf_to_gguf.py,
which the install does not ship), so a Hugging Face folder gets vLLM profiles only.
"""

from __future__ import annotations

import functools

VLLM_VERSION = "0.32.0"
# One string, split below: 118 names read better in lines than one per line.
_VLLM_NAMES = """
    AXK1ForCausalLM AfmoeForCausalLM ApertusForCausalLM BailingMoeForCausalLM
    BailingMoeV2ForCausalLM BailingMoeV2_5ForCausalLM BailingMoeV3ForCausalLM BloomForCausalLM
    ChatGLMForConditionalGeneration ChatGLMModel Cohere2ForCausalLM Cohere2MoeForCausalLM
    CohereForCausalLM DbrxForCausalLM DeciLMForCausalLM DeepseekForCausalLM
    DeepseekV2ForCausalLM DeepseekV32ForCausalLM DeepseekV3ForCausalLM DeepseekV4ForCausalLM
    Ernie4_5ForCausalLM Ernie4_5_MoeForCausalLM Exaone4ForCausalLM ExaoneForCausalLM
    ExaoneMoEForCausalLM ExaoneMoeForCausalLM FalconForCausalLM FalconH1ForCausalLM
    FalconMambaForCausalLM GPT2LMHeadModel GPTJForCausalLM Gemma2ForCausalLM Gemma3ForCausalLM
    Gemma3nForCausalLM Gemma4ForCausalLM GemmaForCausalLM Glm4ForCausalLM Glm4MoeForCausalLM
    Glm4MoeLiteForCausalLM Glm5NextForCausalLM GlmMoeDsaForCausalLM GptOssForCausalLM
    GraniteForCausalLM GraniteMoeForCausalLM GraniteMoeHybridForCausalLM
    GraniteMoeSWAForCausalLM GraniteMoeSharedForCausalLM GraniteSWAForCausalLM
    HCXVisionV2ForCausalLM HYV3ForCausalLM HYV4ForCausalLM HrmTextForCausalLM
    HyperCLOVAXForCausalLM IQuestCoderForCausalLM IQuestLoopCoderForCausalLM InklingForCausalLM
    InklingForConditionalGeneration InternLM2ForCausalLM InternLM3ForCausalLM JambaForCausalLM
    K2HorizonForCausalLM KimiLinearForCausalLM LLaMAForCausalLM LagunaForCausalLM
    Lfm2ForCausalLM Lfm2MoeForCausalLM Llama4ForCausalLM LlamaForCausalLM
    LongcatFlashForCausalLM LongcatFlashNgramForCausalLM Mamba2ForCausalLM MambaForCausalLM
    MiMoForCausalLM MiMoV2FlashForCausalLM MiMoV2ForCausalLM MiniCPM3ForCausalLM
    MiniCPMForCausalLM MiniMaxM2ForCausalLM MiniMaxM3SparseForCausalLM Ministral3ForCausalLM
    MistralForCausalLM MistralLarge3ForCausalLM MixtralForCausalLM MuseGlimmerForCausalLM
    NemotronForCausalLM NemotronHForCausalLM NemotronHPuzzleForCausalLM OPTForCausalLM
    OlmoHybridForCausalLM OlmoeForCausalLM OrionForCausalLM PanguEmbeddedForCausalLM
    PanguProMoEV2ForCausalLM PanguUltraMoEForCausalLM Param2MoEForCausalLM Phi3ForCausalLM
    PhiMoEForCausalLM Plamo3ForCausalLM Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM
    Qwen3MoeForCausalLM Qwen3NextForCausalLM Qwen3_5ForCausalLM Qwen3_5MoeForCausalLM
    Qwen4ExpForCausalLM Rnj1ForCausalLM SarvamMLAForCausalLM SarvamMoEForCausalLM
    SolarForCausalLM StableLmForCausalLM Step1ForCausalLM Step3TextForCausalLM
    Step3p5ForCausalLM TeleChat2ForCausalLM TeleChat3ForCausalLM TeleFLMForCausalLM
    Zamba2ForCausalLM
"""
VLLM_TEXT_GENERATION = frozenset(_VLLM_NAMES.split())

# GGUF architectures llama.cpp loads but that do not generate text (inferd serves chat and
# completion models by path; embedding and rerank models need a catalog entry).
NOT_GENERATIVE = frozenset(
    {
        "bert",
        "clip",
        "eurobert",
        "gemma-embedding",
        "jina-bert-v2",
        "jina-bert-v3",
        "llama-embed",
        "modern-bert",
        "neo-bert",
        "nomic-bert",
        "nomic-bert-moe",
        "t5encoder",
        "wavtokenizer-dec",
    }
)

# GGUF `general.architecture` -> the Hugging Face class transformers converts it into.
# (Mistral GGUFs say "llama"; transformers reads them as Llama.)
GGUF_TO_HF = {
    "bloom": "BloomForCausalLM",
    "falcon": "FalconForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "lfm2": "Lfm2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mamba": "MambaForCausalLM",
    "nemotron": "NemotronForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
}


@functools.cache
def llamacpp_architectures() -> frozenset[str]:
    """Text-generating GGUF architectures llama.cpp knows (from the installed `gguf` package)."""
    import gguf  # numpy and a few tables: cheap, unlike vLLM

    return frozenset(gguf.MODEL_ARCH_NAMES.values()) - NOT_GENERATIVE


def vllm_serves(hf_architecture: str) -> bool:
    return hf_architecture in VLLM_TEXT_GENERATION


def gguf_convertible(gguf_architecture: str) -> str | None:
    """The Hugging Face class of the converted checkpoint, if vLLM can serve it."""
    hf = GGUF_TO_HF.get(gguf_architecture)
    return hf if hf is not None and vllm_serves(hf) else None
