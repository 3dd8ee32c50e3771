"""The benchmark's shapes: SD / SDXL / SD3 / FLUX-shaped random-weight models built from configs,
the shapes world's defaults, the variants and DDPO's H200 reference."""

from typing import Any

import torch

SHAPES = (
    "tiny", "sd15", "sdxl", "tiny_xl", "sd35", "tiny_sd3", "flux", "tiny_flux", "flux2",
    "tiny_flux2", "flux2_klein", "tiny_flux2_klein", "qwen_image", "tiny_qwen_image", "zimage",
    "tiny_zimage", "shapes",
)  # fmt: skip
# SDXL shapes: diffloop.testing.tiny_sdxl.SDXL_CONFIGS size (base 1.0 at 1024 px; the fast-test one)
SDXL_SHAPES = {"sdxl": "base", "tiny_xl": "tiny"}
# flow-matching shapes: (diffloop.testing.tiny_flow.SD3_CONFIGS size, image side or None)
SD3_SHAPES = {"sd35": ("sd35_medium", 512), "tiny_sd3": ("tiny", None)}
# (diffloop.testing.tiny_flux.FLUX_CONFIGS size, image side or None): FLUX.1-dev at 512 px
FLUX_SHAPES = {"flux": ("dev", 512), "tiny_flux": ("tiny", None)}
# (diffloop.testing.tiny_flux2.FLUX2_CONFIGS size, image side or None): FLUX.2-dev at 512 px and
# FLUX.2-klein-4B at 384 px (the Flow-Factory recipes' resolutions)
FLUX2_SHAPES = {
    "flux2": ("dev", 512),
    "tiny_flux2": ("tiny", None),
    "flux2_klein": ("klein_4b", 384),
    "tiny_flux2_klein": ("tiny_klein", None),
}
# (diffloop.testing.tiny_qwen_image.QWEN_IMAGE_CONFIGS size, image side): Qwen-Image at 512 px
# (Flow-Factory's and verl-omni's training resolution); the tiny one at 32 px (8 x 8 latents)
QWEN_IMAGE_SHAPES = {"qwen_image": ("qwen_image", 512), "tiny_qwen_image": ("tiny", 32)}
# (diffloop.testing.tiny_zimage.ZIMAGE_CONFIGS size, image side): Z-Image at 512 px (Flow-Factory's
# training resolution), with 2 of Qwen3-4B's 36 text layers; the tiny one at 32 px
ZIMAGE_SHAPES = {"zimage": ("z_image", 512), "tiny_zimage": ("tiny", 32)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# DDPO's reference implementation on one H200, SD1.5 shape (see the module docstring).
REFERENCE_SD15_H200 = {
    "sample_images_per_s": 2.42,
    "sample_unet_evals_per_s": 242.0,
    "train_s_per_sample": 1.91,
    "unet_tflop_per_eval": 0.803,
    "settings": "sample batch 16, 50 DDIM steps, CFG 5, train batch 4",
}

# Named settings for --variants: performance.* options (PerformanceConfig fields) and bench
# settings. The first variant listed is the baseline the others' speed-ups are computed against.
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {},
    "eager_attention": {"perf": {"attention": "eager"}},
    "channels_last": {"perf": {"channels_last": True}},
    "compile_sampling": {"perf": {"compile": "sampling"}},
    "cudagraphs": {"perf": {"compile": "sampling", "compile_mode": "reduce-overhead"}},
    "compile_all": {"perf": {"compile": "all"}},
    # The reference measurements (docs/performance.md) found compiled LoRA training slower than
    # eager (95 vs 105 samples/s): "fast" compiles the sampling loop (with CUDA graphs) and keeps
    # training eager.
    "fast": {
        "perf": {"compile": "sampling", "compile_mode": "reduce-overhead", "channels_last": True}
    },
    "low_memory": {
        "perf": {"decode_batch_size": 1},
        "gradient_checkpointing": True,
        "sample_batch": 4,
        "train_batch": 1,
    },
}


def real_run(sample_batch: int, train_batch: int, steps: int, **extra: Any) -> dict[str, Any]:
    """A real-size shape's defaults: 3 timed repeats after 1 warm-up, an 8192 matmul probe."""
    batches = {"sample_batch": sample_batch, "train_batch": train_batch, "steps": steps}
    return {**batches, "repeats": 3, "warmup": 1, "matmul_n": 8192, **extra}


def tiny_run(sample_batch: int, train_batch: int, steps: int, **extra: Any) -> dict[str, Any]:
    """A tiny test model's defaults: 1 repeat, no warm-up, a 256 matmul probe."""
    batches = {"sample_batch": sample_batch, "train_batch": train_batch, "steps": steps}
    return {**batches, "repeats": 1, "warmup": 0, "matmul_n": 256, **extra}


# Per-shape defaults for options left unset: (sample_batch, train_batch, steps, repeats, warmup,
# matmul n)
SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # SD3.5-medium at 512 px (Flow-GRPO's training resolution), its 10 training steps, batch 9
    "sd35": real_run(9, 9, 10),
    "tiny_sd3": tiny_run(2, 2, 3),
    # FLUX.1-dev at 512 px with Flow-GRPO's 6 training steps and its sampling batch 3
    "flux": real_run(3, 3, 6),
    # FLUX.2-dev at 512 px with Flow-Factory's 8 steps (examples/grpo/lora/flux2/t2i.yaml); its
    # per-device batch is 1: 2 here (64 GB of transformer leaves little room on one GPU)
    "flux2": real_run(2, 1, 8),
    # FLUX.2-klein-4B at 384 px with the klein-base recipe's 8 steps (CFG at --guidance-scale > 1)
    "flux2_klein": real_run(4, 4, 8),
    "tiny_flux2": tiny_run(2, 2, 3),
    # Qwen-Image at 512 px with the recipes' 10 steps and true CFG 4 (two calls per step)
    "qwen_image": real_run(2, 2, 10, guidance_scale=4.0),
    "tiny_qwen_image": tiny_run(2, 2, 3, guidance_scale=4.0),
    "tiny_flux2_klein": tiny_run(2, 2, 3),
    # Z-Image (base) at 512 px with Flow-Factory's 10 steps and CFG w = 5 (its guidance_scale 4)
    "zimage": real_run(4, 2, 10, guidance_scale=5.0),
    "tiny_zimage": tiny_run(2, 2, 3, guidance_scale=4.0),
    "tiny_flux": tiny_run(2, 2, 3),
    "tiny": tiny_run(2, 2, 2),
    "tiny_xl": tiny_run(1, 1, 2),
    "sd15": real_run(16, 4, 50),
    "sdxl": real_run(4, 1, 50),
    # The embedded default (configs/shapes.yaml): sample.batch_size, train.batch_size, num_steps,
    # guidance_scale are read from that file (shapes_defaults); a 1024^2 matmul is the CPU floor.
    "shapes": {"repeats": 3, "warmup": 1, "matmul_n": 1024},
}


def shapes_defaults() -> dict[str, Any]:
    """The shapes world's bench settings from the packaged shapes.yaml (the default run's
    shapes)."""
    from diffloop.config import DEFAULT_CONFIG, load_config, packaged_config

    c = load_config(packaged_config(DEFAULT_CONFIG))
    return {
        "sample_batch": c.sample.batch_size,
        "train_batch": c.train.batch_size,
        "steps": c.sample.num_steps,
        "guidance_scale": c.sample.guidance_scale,
    }


# ------------------------------------------------------------------------------------ model configs


def unet_config(shape: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for ``shape`` (SD1.5 / SDXL values from their
    config.json)."""
    if shape == "tiny":
        from diffloop.testing.tiny import UNET_CONFIG

        return dict(UNET_CONFIG)  # the test suite's tiny UNet (diffloop.testing.tiny)
    if shape == "sd15":
        return {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _sd15_text_config(tokenizer: Any) -> Any:
    """CLIP ViT-L/14's text tower, as SD 1.5 ships it."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


SD15_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> Any:
    """Stable Diffusion's DDIM schedule (``diffloop.testing.tiny.sd_ddim_scheduler``)."""
    from diffloop.testing.tiny import sd_ddim_scheduler as build

    return build(prediction_type)


def build_components(shape: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random-weight {"unet", "text_encoder", "tokenizer", "scheduler", "vae"} for an SD-style
    shape.

    ``tiny`` is the test suite's tiny SD (``diffloop.testing.tiny``). Others are built directly on
    ``device`` (random init of 1e9 parameters on the CPU alone takes minutes). The tokenizer is a
    word-level one (no download); CLIP's cost does not depend on which ids it sees.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffloop.testing import tiny

    tokenizer = tiny.make_word_tokenizer(tiny.PROMPT_WORDS)
    if shape == "tiny":
        return tiny.build_tiny_components(seed=seed, tokenizer=tokenizer, device=device)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(shape))
        text_encoder = CLIPTextModel(_sd15_text_config(tokenizer))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    scheduler = sd_ddim_scheduler()
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "vae": vae,
    }
