"""Write a full-size Sana pipeline folder (diffusers layout) with random weights, for GPU runs without the Hub.

    python bench/make_random_pipeline.py --preset sana-600m-1024 --out /tmp/sana-600m-random [--device cuda]

Transformer and DC-AE come from our presets (written in the diffusers layout), the text encoder is a random
Gemma-2-2B (transformers' Gemma2Model with the released architecture) and the tokenizer a small byte-level BPE
trained here (the real Gemma tokenizer needs the Hub). Images from it are noise; timings and memory are real.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from sana.models import DCAE, DCAE_PRESETS, TRANSFORMER_PRESETS, SanaTransformer
from sana.models.text_encoder import DEFAULT_CHI
from sana.pipeline import PIPELINE_PRESETS, Sampler
from sana.train.text_model import train_tokenizer
from sana.weights.load import save_model

GEMMA_2_2B = dict(  # google/gemma-2-2b-it architecture
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    sliding_window=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(list(DEFAULT_CHI) * 4 + ["a cat in a hat", "a red fox in the snow"], 2000)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sana-600m-1024", choices=sorted(TRANSFORMER_PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    with torch.device(args.device):
        transformer = SanaTransformer(TRANSFORMER_PRESETS[args.preset]).bfloat16()
        ae = DCAE(DCAE_PRESETS["dc-ae-f32c32-sana-1.1"]).bfloat16()
        gemma = Gemma2Model(Gemma2Config(**GEMMA_2_2B)).bfloat16()
    save_model(transformer, out / "transformer", layout="diffusers")
    save_model(ae, out / "vae", layout="diffusers")
    gemma.save_pretrained(out / "text_encoder")
    tokenizer().save_pretrained(out / "tokenizer")
    preset = PIPELINE_PRESETS.get(args.preset)
    sprint = preset is not None and preset.sampler is Sampler.SCM
    sched = (
        {"_class_name": "SCMScheduler", "sigma_data": 0.5}
        if sprint
        else {
            "_class_name": "DPMSolverMultistepScheduler",
            "flow_shift": preset.flow_shift if preset else 3.0,
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
        }
    )
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    index = {"_class_name": "SanaSprintPipeline" if sprint else "SanaPipeline"}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
