"""The converter infers the FULL official XReal architecture from tensor shapes alone.

The official checkpoints cannot be shipped here, so their CompVis key layout is generated from
the original hyper-parameters (openaimodel UNetModel, CompVis AutoencoderKL, x_transformer
BERTEmbedder). The generator is first checked against the real fixture checkpoint: for the tiny
config it must produce exactly the fixture's keys and shapes. At full size the tensors live on
torch's "meta" device (no memory), and the converted modules must have exactly the parameter
counts that the original classes have (fixture README: UNet 518,166,659; LDM-BERT 582,087,482;
each AutoencoderKL 55,312,063).
"""

from __future__ import annotations

import pytest
import torch

from xreal_engine.model.convert import (
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    BERT_PREFIX,
    convert_autoencoder,
    convert_text_encoder,
    convert_unet,
)
from xreal_engine.errors import ModelError


def compvis_unet_shapes(model_channels, channel_mult, num_res_blocks, attention_levels, context_dim,
                        in_channels=3, out_channels=3, transformer_depth=1) -> dict[str, tuple]:
    """Key -> shape of an openaimodel UNetModel with SpatialTransformers (legacy=False, conv proj_in)."""
    shapes: dict[str, tuple] = {}
    time_dim = 4 * model_channels

    def conv(name, cout, cin, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def linear(name, cout, cin, bias=True):
        shapes[f"{name}.weight"] = (cout, cin)
        if bias:
            shapes[f"{name}.bias"] = (cout,)

    def norm(name, channels):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (channels,), (channels,)

    def resblock(prefix, cin, cout):
        norm(f"{prefix}.in_layers.0", cin)
        conv(f"{prefix}.in_layers.2", cout, cin)
        linear(f"{prefix}.emb_layers.1", cout, time_dim)
        norm(f"{prefix}.out_layers.0", cout)
        conv(f"{prefix}.out_layers.3", cout, cout)
        if cin != cout:
            conv(f"{prefix}.skip_connection", cout, cin, k=1)

    def transformer(prefix, channels):
        norm(f"{prefix}.norm", channels)
        conv(f"{prefix}.proj_in", channels, channels, k=1)
        for depth in range(transformer_depth):
            block = f"{prefix}.transformer_blocks.{depth}"
            for attention, kv_width in (("attn1", channels), ("attn2", context_dim)):
                linear(f"{block}.{attention}.to_q", channels, channels, bias=False)
                linear(f"{block}.{attention}.to_k", channels, kv_width, bias=False)
                linear(f"{block}.{attention}.to_v", channels, kv_width, bias=False)
                linear(f"{block}.{attention}.to_out.0", channels, channels)
            linear(f"{block}.ff.net.0.proj", 8 * channels, channels)  # GEGLU: 2 x (4 x channels)
            linear(f"{block}.ff.net.2", channels, 4 * channels)
            for index in (1, 2, 3):
                norm(f"{block}.norm{index}", channels)
        conv(f"{prefix}.proj_out", channels, channels, k=1)

    linear("time_embed.0", time_dim, model_channels)
    linear("time_embed.2", time_dim, time_dim)
    conv("input_blocks.0.0", model_channels, in_channels)
    skip_widths, width, block = [model_channels], model_channels, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{block}.0", width, mult * model_channels)
            width = mult * model_channels
            if level in attention_levels:
                transformer(f"input_blocks.{block}.1", width)
            skip_widths.append(width)
            block += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{block}.0.op", width, width)
            skip_widths.append(width)
            block += 1
    resblock("middle_block.0", width, width)
    transformer("middle_block.1", width)
    resblock("middle_block.2", width, width)
    block = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for index in range(num_res_blocks + 1):
            resblock(f"output_blocks.{block}.0", width + skip_widths.pop(), mult * model_channels)
            width = mult * model_channels
            sub = 1
            if level in attention_levels:
                transformer(f"output_blocks.{block}.1", width)
                sub = 2
            if level and index == num_res_blocks:
                conv(f"output_blocks.{block}.{sub}.conv", width, width)
            block += 1
    norm("out.0", model_channels)
    conv("out.2", out_channels, model_channels)
    return shapes


def compvis_autoencoder_shapes(ch, ch_mult, num_res_blocks, z_channels=3, in_channels=3, out_channels=3) -> dict[str, tuple]:
    """Key -> shape of a CompVis AutoencoderKL (attn_resolutions empty, double_z, embed_dim = z_channels)."""
    shapes: dict[str, tuple] = {}

    def conv(name, cout, cin, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, channels):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (channels,), (channels,)

    def resnet(prefix, cin, cout):
        norm(f"{prefix}.norm1", cin)
        conv(f"{prefix}.conv1", cout, cin)
        norm(f"{prefix}.norm2", cout)
        conv(f"{prefix}.conv2", cout, cout)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cout, cin, k=1)

    def middle(prefix, channels):
        resnet(f"{prefix}.mid.block_1", channels, channels)
        norm(f"{prefix}.mid.attn_1.norm", channels)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{name}", channels, channels, k=1)
        resnet(f"{prefix}.mid.block_2", channels, channels)

    conv("encoder.conv_in", ch, in_channels)
    width = ch
    for level, mult in enumerate(ch_mult):
        for block in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{block}", width, ch * mult)
            width = ch * mult
        if level != len(ch_mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", width, width)
    middle("encoder", width)
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", 2 * z_channels, width)
    conv("decoder.conv_in", width, z_channels)
    middle("decoder", width)
    for level in reversed(range(len(ch_mult))):
        for block in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{block}", width, ch * ch_mult[level])
            width = ch * ch_mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", width, width)
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", out_channels, width)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, k=1)
    conv("post_quant_conv", z_channels, z_channels, k=1)
    return shapes


def compvis_bert_shapes(vocab_size, width, layers, positions=150, heads=8, dim_head=64) -> dict[str, tuple]:
    """Key -> shape of x_transformer's TransformerWrapper(Encoder) as used by CompVis BERTEmbedder."""
    inner = heads * dim_head
    shapes = {"token_emb.weight": (vocab_size, width), "pos_emb.emb.weight": (positions, width)}
    for layer in range(layers):
        attention, feed_forward = f"attn_layers.layers.{2 * layer}", f"attn_layers.layers.{2 * layer + 1}"
        for sub in (attention, feed_forward):
            shapes[f"{sub}.0.weight"], shapes[f"{sub}.0.bias"] = (width,), (width,)
        for name in ("to_q", "to_k", "to_v"):
            shapes[f"{attention}.1.{name}.weight"] = (inner, width)
        shapes[f"{attention}.1.to_out.weight"], shapes[f"{attention}.1.to_out.bias"] = (width, inner), (width,)
        shapes[f"{feed_forward}.1.net.0.0.weight"], shapes[f"{feed_forward}.1.net.0.0.bias"] = (4 * width, width), (4 * width,)
        shapes[f"{feed_forward}.1.net.2.weight"], shapes[f"{feed_forward}.1.net.2.bias"] = (width, 4 * width), (width,)
    shapes["norm.weight"], shapes["norm.bias"] = (width,), (width,)
    shapes["to_logits.weight"], shapes["to_logits.bias"] = (vocab_size, width), (vocab_size,)
    return shapes


def meta_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.fixture(scope="module")
def fixture_backbone(fixtures_dir) -> dict:
    state = torch.load(fixtures_dir / "checkpoints" / "backbone.pth", map_location="cpu", weights_only=True)
    return state["state_dict"]


def _shapes_under(state: dict, prefix: str) -> dict[str, tuple]:
    return {key[len(prefix):]: tuple(value.shape) for key, value in state.items() if key.startswith(prefix)}


def test_layout_generator_matches_the_fixture_checkpoints(fixture_backbone, fixtures_dir):
    assert compvis_unet_shapes(32, [1, 1], 1, {1}, 64) == _shapes_under(fixture_backbone, UNET_PREFIX)
    assert compvis_autoencoder_shapes(32, [1, 1, 2], 1) == _shapes_under(fixture_backbone, FIRST_STAGE_PREFIX)
    assert compvis_bert_shapes(58, 64, 2) == _shapes_under(fixture_backbone, BERT_PREFIX)
    anatomy = torch.load(fixtures_dir / "checkpoints" / "anatomy_controller.pth", map_location="cpu", weights_only=True)
    anatomy_shapes = {k: tuple(v.shape) for k, v in anatomy["state_dict"].items() if not k.startswith("loss.")}
    assert compvis_autoencoder_shapes(32, [1, 1, 2], 1) == anatomy_shapes


def test_official_unet_is_inferred_from_shapes():
    # Official: model_channels 224, channel_mult [1,2,4,4], attention_resolutions [8,4,2] (levels 1-3), 2 res blocks.
    state = meta_state(compvis_unet_shapes(224, [1, 2, 4, 4], 2, {1, 2, 3}, 1280))
    unet = convert_unet(state, attention_heads=8, image_size=256, vae_ch_mult=[1, 2, 4])
    config = unet.config
    assert list(config.block_out_channels) == [224, 448, 896, 896]
    assert list(config.down_block_types) == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3
    assert list(config.up_block_types) == ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]
    assert config.layers_per_block == 2 and config.cross_attention_dim == 1280
    assert config.attention_head_dim == 8 and config.sample_size == 64 and config.use_linear_projection is False
    assert parameter_count(unet) == 518_166_659


def test_official_autoencoder_is_inferred_from_shapes():
    state = meta_state(compvis_autoencoder_shapes(128, [1, 2, 4], 2))
    autoencoder = convert_autoencoder(state, image_size=256, role="autoencoder", scaling_factor=0.18215)
    assert list(autoencoder.config.block_out_channels) == [128, 256, 512]
    assert autoencoder.config.layers_per_block == 2 and autoencoder.config.latent_channels == 3
    assert parameter_count(autoencoder) == 55_312_063


def test_official_text_encoder_is_inferred_from_shapes():
    state = meta_state(compvis_bert_shapes(30522, 1280, 32))
    text_encoder = convert_text_encoder(state)
    config = text_encoder.config
    assert (config.d_model, config.encoder_layers, config.max_position_embeddings) == (1280, 32, 150)
    assert (config.encoder_attention_heads, config.head_dim, config.encoder_ffn_dim) == (8, 64, 5120)
    assert parameter_count(text_encoder) == 582_087_482


def test_official_unet_with_wrong_head_count_is_refused():
    state = meta_state(compvis_unet_shapes(224, [1, 2, 4, 4], 2, {1, 2, 3}, 1280))
    with pytest.raises(ModelError, match="attention-heads 3"):
        convert_unet(state, attention_heads=3, image_size=256, vae_ch_mult=[1, 2, 4])
