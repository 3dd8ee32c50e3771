"""The shapes world's small text-to-image diffusion model, in diffusers layout.

Pixel space: an image is (3, 32, 32) scaled to [-1, 1]; there is no VAE. The model is four
components saved the way diffusers/transformers save them, so that a generic loader calls
``<Class>.from_pretrained(dir, subfolder=...)`` on each and reads the absence of ``vae/`` as pixel
space::

    dir/unet/                 UNet2DConditionModel (safetensors)
    dir/text_encoder/         transformers CLIPTextModel (safetensors), trained from scratch
    dir/tokenizer/            word-level PreTrainedTokenizerFast over world.vocabulary()
    dir/scheduler/            DDIMScheduler config (epsilon prediction, DDPM linear betas)
    dir/diffloop_model.json   {"family": "shapes", "image_size": 32, "pixel_space": true, ...}

Shape notation: N images, L = max_length text tokens, D = text hidden size, H = W = 32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SHIPPED_WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Where the pretrained weights ship inside the package (loaded with ``load_components``)."""

MODEL_INFO_FILE = "diffloop_model.json"
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3, in this order


@dataclass(frozen=True)
class ShapesModelConfig:
    """Architecture of the shapes model. Defaults are sized for RL on a 2-core CPU.

    Defaults: UNet 440k parameters (~165 MFLOP per 32x32 forward), text encoder 69k. Measured on
    the shared 2-core dev machine, torch.set_num_threads(2), min of 3: forward of a batch of 128
    0.85 s, forward + backward of a batch of 32 0.6-0.8 s; (32, 64, 64) channels (1.7M parameters)
    was 1.6 s and 1.1 s.

    Fields:
        image_size: side of the square RGB image the UNet denoises (pixel space).
        block_out_channels: UNet channels per resolution (32 -> 16 -> 8 px for three blocks).
            The first block is convolution only; the lower-resolution ones have cross-attention.
        layers_per_block: ResNet (+ transformer) layers per UNet block; the main cost knob.
        attention_head_dim: channels per attention head in the UNet's transformer blocks.
        norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
        text_hidden_size: width D of the text encoder, also the UNet's cross_attention_dim.
        text_layers, text_heads, text_intermediate_size: the CLIP text transformer's depth, heads
            and MLP width.
        max_length: L, the fixed padded token length ([BOS] caption [EOS] [PAD]...).
        prediction_type: what the UNet predicts: "epsilon" (default; the shipped weights) or
            "v_prediction". With eps and these betas, x0_hat = (x_t - sqrt(1 - a_bar) eps_hat)
            / sqrt(a_bar) multiplies the eps error by (1 - a_bar) / a_bar (~600 at t = 800):
            after ~2k CPU steps of batch 16 an eps model still drew saturated canvases (x0 error
            above the data variance for t >= 600) where a v model already drew objects on the
            right background. With GPU-scale training (~1M samples) eps is fine.
        beta_schedule, beta_start, beta_end: the DDPM noise schedule over 1000 training steps.
        vocabulary: the caption words; None means ``diffloop.shapes.world.vocabulary()``.
    """

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    attention_head_dim: int = 16
    norm_num_groups: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 128
    max_length: int = 16
    prediction_type: str = "epsilon"
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    vocabulary: tuple[str, ...] | None = None


def build_tokenizer(vocabulary: list[str] | tuple[str, ...], max_length: int) -> Any:
    """A word-level fast tokenizer: lower-cased whitespace words -> ids, ``[BOS] words [EOS]``,
    padded with [PAD] (id 0) and truncated to ``max_length`` by default.

    Ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, then the sorted unique vocabulary words.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w.lower() for w in vocabulary} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        padding_side="right",
    )


def build_components(config: ShapesModelConfig | None = None) -> dict[str, Any]:
    """Random-weight {"unet", "text_encoder", "tokenizer", "scheduler"} built from ``config``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or ShapesModelConfig()
    vocabulary = config.vocabulary
    if vocabulary is None:
        from diffloop.shapes import world

        vocabulary = tuple(world.vocabulary())
    tokenizer = build_tokenizer(vocabulary, config.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_intermediate_size,
            projection_dim=config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            hidden_act="gelu",
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    n_blocks = len(config.block_out_channels)
    # Cross-attention only below full resolution: attention over 32x32 = 1024 tokens would
    # dominate the CPU cost, and binding (which object gets which attribute) is a coarse decision.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1)
    up = ("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=config.prediction_type,
    )
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_components(
    components: dict[str, Any], directory: str | Path, extra_info: dict[str, Any] | None = None
) -> Path:
    """Write ``components`` to ``directory`` in diffusers layout (see the module docstring).

    ``extra_info`` (e.g. pretraining provenance) is merged into ``diffloop_model.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components["unet"].save_pretrained(directory / "unet", safe_serialization=True)
    components["text_encoder"].save_pretrained(directory / "text_encoder", safe_serialization=True)
    _nest_text_encoder_keys(directory / "text_encoder" / "model.safetensors")
    components["tokenizer"].save_pretrained(directory / "tokenizer")
    _portable_tokenizer_class(directory / "tokenizer" / "tokenizer_config.json")
    components["scheduler"].save_pretrained(directory / "scheduler")
    info = {
        "family": "shapes",
        "image_size": int(components["unet"].config.sample_size),
        "pixel_space": True,
        "max_length": int(components["tokenizer"].model_max_length),
        "prediction_type": components["scheduler"].config.prediction_type,
        **(extra_info or {}),
    }
    (directory / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def _nest_text_encoder_keys(weights_file: Path) -> None:
    """Store CLIPTextModel weights under the ``text_model.`` prefix.

    transformers >= 5.6 flattened CLIPTextModel and saves ``embeddings.*``; earlier versions only
    load ``text_model.embeddings.*``, and >= 5.6 strips that prefix on load, so the nested layout
    loads everywhere.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(weights_file)
    if all(k.startswith("text_model.") for k in state):
        return
    nested = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    save_file(nested, weights_file, metadata={"format": "pt"})


def _portable_tokenizer_class(config_file: Path) -> None:
    """Name the generic fast tokenizer ``PreTrainedTokenizerFast`` in its config.

    transformers 5 writes its implementation name ``TokenizersBackend``, which transformers 4
    cannot resolve; 5.x loads ``PreTrainedTokenizerFast`` as the same class.
    """
    config = json.loads(config_file.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def load_components(directory: str | Path = SHIPPED_WEIGHTS_DIR) -> dict[str, Any]:
    """Load the components written by ``save_components`` (offline: local files only)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    directory = Path(directory)
    if not (directory / MODEL_INFO_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} holds no {MODEL_INFO_FILE}: not a shapes model directory"
        )
    return {
        "unet": UNet2DConditionModel.from_pretrained(directory, subfolder="unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(directory, subfolder="text_encoder").eval(),
        "tokenizer": AutoTokenizer.from_pretrained(directory, subfolder="tokenizer"),
        "scheduler": DDIMScheduler.from_pretrained(directory, subfolder="scheduler"),
    }


def tokenize(
    tokenizer: Any, prompts: list[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(N, L) long token ids, padded/truncated to the tokenizer's fixed ``model_max_length``."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def encode_prompts(
    tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str]
) -> torch.Tensor:
    """(N, L, D) last hidden states of the text encoder: the UNet's cross-attention context.

    No attention mask, as in Stable Diffusion: the encoder is causal, so [PAD] states only see the
    caption, and the UNet attends over all L positions.
    """
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenize(tokenizer, prompts, device)).last_hidden_state


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 in [0, 255] -> (N, 3, H, W) float in [-1, 1]: x = 2 u / 255 - 1."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) model space -> [0, 1]: (clamp(x, -1, 1) + 1) / 2."""
    return (x.float().clamp(-1.0, 1.0) + 1.0) / 2.0


@torch.no_grad()
def generate(
    components: dict[str, Any],
    prompts: list[str],
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Sample images for ``prompts`` with DDIM and classifier-free guidance; (N, 3, H, W) in [0, 1].

    eps_hat = eps(x_t, "") + w (eps(x_t, c) - eps(x_t, ""))   (w = guidance_scale; w <= 1: no CFG)
    then one ``DDIMScheduler.step`` per timestep. For evaluation and tests; the RL sampler (with
    per-step log-probs) lives in the policy.
    """
    from diffusers import DDIMScheduler

    unet, tokenizer, text_encoder = (
        components["unet"],
        components["tokenizer"],
        components["text_encoder"],
    )
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    # A private scheduler: set_timesteps mutates state, and the shared one may be in use elsewhere.
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    scheduler.set_timesteps(num_steps, device=device)
    n, size = len(prompts), int(unet.config.sample_size)
    cond = encode_prompts(tokenizer, text_encoder, prompts).to(dtype)
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        uncond = encode_prompts(tokenizer, text_encoder, [negative_prompt] * n).to(dtype)
        context = torch.cat([uncond, cond])  # (2N, L, D)
    else:
        context = cond
    x = torch.randn((n, 3, size, size), generator=generator, device=device, dtype=torch.float32)
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if use_cfg else x
        out = unet(model_in.to(dtype), t, encoder_hidden_states=context).sample.float()
        if use_cfg:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        x = scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
    return to_unit_range(x)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def config_dict(config: ShapesModelConfig) -> dict[str, Any]:
    """``config`` as a JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
