"""VideoBoothPipeline behaves as diffusers' own pipelines do (issue 30): step-end callbacks with
the pipeline's guidance properties (diffusers.callbacks' objects included), every save option
reaching every component, components left out (None) where diffusers allows it, offloading and
layerwise casting on CPU. Tiny random components, a few seconds each."""
import copy

import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

import vb

from test_vb_diffusers_pipeline import KW, gen, image, make_pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe("unet")


def _spy(p):
    """Record the batch size of every backbone call of ``p`` (undo with ``del p._predict``)."""
    sizes, orig = [], p._predict

    def spy(x, t, *cond):
        sizes.append(x.shape[0])
        return orig(x, t, *cond)

    p._predict = spy
    return sizes


# ---- 1. callbacks ----------------------------------------------------------------------------------
def test_callback_reads_the_guidance_properties(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance, p.interrupt))
        return kw

    gen(pipe, num_inference_steps=3, guidance_scale=4.0, callback_on_step_end=cb)
    assert seen == [(3, 4.0, True, False)] * 3
    seen.clear()
    gen(pipe, guidance_scale=1.0, callback_on_step_end=cb)
    assert seen == [(2, 1.0, False, False)] * 2


@pytest.mark.parametrize("uncond_image,full,cut", [("none", [1, 1], [1]), ("grey", [2], [1])])
def test_diffusers_cfg_cutoff_callback_ends_guidance_for_the_rest_of_the_loop(pipe, uncond_image, full, cut):
    """diffusers' own SDCFGCutoffCallback (tensor_inputs ["prompt_embeds"], sets
    pipe._guidance_scale = 0 at the cutoff step and cuts the embeddings to their last row: a
    no-op at batch 1): from the next step on, one conditional pass per step (batch B, not 2B)."""
    p = copy.deepcopy(pipe)
    sizes = _spy(p)
    steps = 3
    ref = gen(p, num_inference_steps=steps, uncond_image=uncond_image)
    assert sizes == full * steps
    sizes.clear()
    out = gen(p, num_inference_steps=steps, uncond_image=uncond_image,
              callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    assert sizes == full + cut * (steps - 1)
    assert p.guidance_scale == 0.0 and not p.do_classifier_free_guidance
    assert not torch.equal(out, ref)
    # the same as cutting guidance by hand at that step (the ratio form reads pipe.num_timesteps)
    sizes.clear()
    ratio = gen(p, num_inference_steps=steps, uncond_image=uncond_image,
                callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.0))
    assert torch.equal(ratio, out) and sizes == full + cut * (steps - 1)


def test_callback_may_switch_guidance_on_mid_loop_grey_included(pipe):
    p = copy.deepcopy(pipe)
    sizes = _spy(p)

    def on(pp, i, t, kw):
        pp._guidance_scale = 5.0
        return kw

    gen(p, num_inference_steps=3, guidance_scale=1.0, uncond_image="grey", callback_on_step_end=on)
    assert sizes == [1, 2, 2]  # the grey image prompt was ready although the call began unguided


class _Record(PipelineCallback):
    tensor_inputs = ["latents", "negative_prompt_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.keys = sorted(callback_kwargs)
        callback_kwargs["latents"] = callback_kwargs["latents"] * 0 if step_index == 0 else callback_kwargs["latents"]
        return callback_kwargs


def test_multi_pipeline_callbacks_get_the_union_of_their_tensor_inputs(pipe):
    rec = _Record()
    both = MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1), rec])
    out = gen(pipe, callback_on_step_end=both, callback_on_step_end_tensor_inputs=["latents"])
    # the objects' own tensor_inputs count, not the call's list (as in diffusers' pipelines)
    assert rec.keys == ["latents", "negative_prompt_embeds", "prompt_embeds"]
    assert not torch.equal(out, gen(pipe))


def test_callback_returning_new_prompt_embeds_changes_the_next_steps(pipe):
    def swap(p, i, t, kw):
        return {"prompt_embeds": kw["negative_prompt_embeds"]} if i == 0 else {}

    assert not torch.equal(gen(pipe, callback_on_step_end=swap, callback_on_step_end_tensor_inputs=[
        "prompt_embeds", "negative_prompt_embeds"]), gen(pipe))


def test_callback_tensor_inputs_are_checked(pipe):
    class Unknown(PipelineCallback):
        tensor_inputs = ["add_time_ids"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return callback_kwargs

    class NoInputs(PipelineCallback):
        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return callback_kwargs

    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs.*add_time_ids"):
        gen(pipe, callback_on_step_end=Unknown())
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs.*add_time_ids"):
        gen(pipe, callback_on_step_end=MultiPipelineCallbacks([_Record(), Unknown()]))
    with pytest.raises(TypeError, match="callback_on_step_end: NoInputs does not set tensor_inputs"):
        gen(pipe, callback_on_step_end=NoInputs())

    def cut(p, i, t, kw):  # a batch cut to one row at batch 2: refused, not broadcast
        return {"prompt_embeds": kw["prompt_embeds"][-1:]}

    with pytest.raises(ValueError, match="callback_on_step_end: returned 'prompt_embeds' must keep its shape"):
        gen(pipe, num_videos_per_prompt=2, callback_on_step_end=cut,
            callback_on_step_end_tensor_inputs=["prompt_embeds"])


# ---- 2. save options ----------------------------------------------------------------------------------
MODEL_FOLDERS = ("backbone", "image_encoder", "mapper", "vae")  # diffusers ModelMixin components


def _weights(folder):
    return sorted(f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".json")
                  and f.name != "config.json")


def _same_weights(p, q):
    for name in MODEL_FOLDERS + ("text_encoder",):
        sa, sb = getattr(p, name).state_dict(), getattr(q, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_save_overrides_name_every_option_of_diffusers_model_save():
    """DiffusionPipeline.save_pretrained passes an option only to save methods that name it: the
    overrides must name every parameter ModelMixin.save_pretrained has (today and after an upgrade)."""
    import inspect

    from diffusers.models.modeling_utils import ModelMixin

    want = {k for k, v in inspect.signature(ModelMixin.save_pretrained).parameters.items()
            if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
    assert {"safe_serialization", "variant", "max_shard_size"} <= want
    for cls in (vb.VideoBoothUNet, vb.VideoDiT, vb.VideoBoothImageEncoder):
        got = set(inspect.signature(cls.save_pretrained).parameters)
        assert want <= got, (cls.__name__, sorted(want - got))


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_variant_tags_every_weight_file_and_loads_back(tmp_path, backbone):
    p = make_pipe(backbone)
    p.save_pretrained(tmp_path, variant="fp16")
    for name in MODEL_FOLDERS:
        assert _weights(tmp_path / name) == ["diffusion_pytorch_model.fp16.safetensors"], name
    assert _weights(tmp_path / "text_encoder") == ["model.fp16.safetensors"]
    q = vb.VideoBoothPipeline.from_pretrained(tmp_path, variant="fp16")
    q.set_progress_bar_config(disable=True)
    _same_weights(p, q)
    assert torch.equal(gen(q), gen(p))
    with pytest.raises((OSError, ValueError)):  # there is no untagged copy to load
        vb.VideoBoothPipeline.from_pretrained(tmp_path)


def test_safe_serialization_false_writes_pickles_where_the_library_can(tmp_path, pipe):
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    for name in MODEL_FOLDERS:
        assert _weights(tmp_path / name) == ["diffusion_pytorch_model.bin"], name
    # transformers 5 saves safetensors only (its save_pretrained has no safe_serialization)
    assert _weights(tmp_path / "text_encoder") == ["model.safetensors"]
    q = vb.VideoBoothPipeline.from_pretrained(tmp_path)
    _same_weights(pipe, q)


def test_sharded_save_reloads(tmp_path, pipe):
    pipe.save_pretrained(tmp_path, max_shard_size="100KB")
    files = _weights(tmp_path / "backbone")
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3, files
    assert len(_weights(tmp_path / "image_encoder")) > 2
    q = vb.VideoBoothPipeline.from_pretrained(tmp_path)
    q.set_progress_bar_config(disable=True)
    _same_weights(pipe, q)
    assert torch.equal(gen(q), gen(pipe))


# ---- 3. components left out -------------------------------------------------------------------------
ENCODERS = dict(text_encoder=None, tokenizer=None, image_encoder=None, mapper=None)


def _embeds(enc, negative="blurry"):
    """diffusers' memory-saving first half: the encoders alone encode the prompts."""
    images = enc.prepare_image(image(), 1, 16, 16)
    tokens, _ = enc.encode_image(images)
    text, pooled, neg, neg_pooled, null, null_pooled = enc.encode_prompt("a dog on grass", "dog", tokens,
                                                                         negative_prompt=negative)
    return dict(prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled, null_prompt_embeds=null, null_pooled_prompt_embeds=null_pooled)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_encode_with_the_encoders_alone_then_denoise_without_them(backbone):
    full = make_pipe(backbone)
    ref = gen(full, negative_prompt="blurry")
    enc = vb.VideoBoothPipeline.from_pipe(full, backbone=None, vae=None)
    assert enc.backbone is None and enc.vae is None and enc.text_encoder is full.text_encoder
    with pytest.raises(ValueError, match="backbone: this pipeline has no backbone"):
        gen(enc)
    kw = _embeds(enc)
    del enc
    if backbone == "unet":  # the U-Net reads no CLIP embedding: no image encoder needed either
        den = vb.VideoBoothPipeline.from_pipe(full, **ENCODERS)
    else:  # the DiT reads the pooled CLIP image embedding
        with pytest.raises(ValueError, match="image_encoder: this pipeline has no image_encoder"):
            gen(vb.VideoBoothPipeline.from_pipe(full, **ENCODERS), **kw)
        den = vb.VideoBoothPipeline.from_pipe(full, text_encoder=None, tokenizer=None)
    den.set_progress_bar_config(disable=True)
    assert torch.equal(gen(den, **kw), ref)
    with pytest.raises(ValueError, match="tokenizer: this pipeline has no tokenizer"):  # the null prompt is missing
        gen(den, **{k: v for k, v in kw.items() if not k.startswith("null")})


def test_a_call_that_needs_a_missing_component_names_it(pipe):
    no_vae = vb.VideoBoothPipeline.from_pipe(pipe, vae=None)
    assert no_vae.vae_scale_factor == 8  # diffusers' default without a VAE
    with pytest.raises(ValueError, match="vae: this pipeline has no vae"):
        no_vae("a dog", "dog", image(), num_frames=2, height=16, width=16, num_inference_steps=1)
    with pytest.raises(ValueError, match="image_encoder: this pipeline has no image_encoder"):
        gen(vb.VideoBoothPipeline.from_pipe(pipe, image_encoder=None))
    with pytest.raises(ValueError, match="text_encoder: this pipeline has no text_encoder"):
        gen(vb.VideoBoothPipeline.from_pipe(pipe, text_encoder=None))


def test_pipeline_without_backbone_and_vae_saves_and_loads(tmp_path, pipe):
    enc = vb.VideoBoothPipeline(**dict(pipe.components, backbone=None, vae=None))
    enc.save_pretrained(tmp_path)
    assert not (tmp_path / "backbone").exists() and not (tmp_path / "vae").exists()
    back = vb.VideoBoothPipeline.from_pretrained(tmp_path)
    assert back.backbone is None and back.vae is None
    a, b = _embeds(enc), _embeds(back)
    assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)


# ---- 4. offloading and casting -------------------------------------------------------------------------
def test_model_cpu_offload_gives_the_plain_output(pipe):
    """diffusers' enable_model_cpu_offload (accelerate's hooks, in model_cpu_offload_seq's order).
    Without an accelerator diffusers refuses the default device; device="cpu" runs the same hooks."""
    ref = gen(pipe, output_type="pt")
    p = copy.deepcopy(pipe)
    p.enable_model_cpu_offload(device="cpu")
    assert [type(h).__name__ for h in p._all_hooks] and p._execution_device.type == "cpu"
    assert torch.equal(gen(p, output_type="pt"), ref)
    assert torch.equal(gen(p, output_type="pt"), ref)  # the hooks re-armed after the call (maybe_free_model_hooks)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_of_the_backbone_gives_the_plain_output(pipe, offload_type):
    ref = gen(pipe)
    p = copy.deepcopy(pipe)
    kw = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    p.backbone.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                    offload_type=offload_type, **kw)
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    assert _is_group_offload_enabled(p.backbone)
    assert torch.equal(gen(p), ref)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_layerwise_casting_to_float8_storage_computes_in_fp32(backbone):
    """diffusers' layerwise casting: weights stored in float8, each layer upcast to fp32 for its
    forward. The pipeline's latents follow the compute dtype (the backbone's ModelMixin.dtype;
    it drew its noise in float8 before: "normal_kernel_cpu not implemented for 'Float8_e4m3fn'").
    Equal to the plain pipeline whose weights are those float8 values."""
    p = make_pipe(backbone)
    rounded = copy.deepcopy(p)
    p.backbone.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    stored = {k: v for k, v in p.backbone.state_dict().items() if v.dtype == torch.float8_e4m3fn}
    assert stored and p.backbone.dtype == torch.float32
    with torch.no_grad():
        own = rounded.backbone.state_dict()
        for k, v in stored.items():
            own[k].copy_(v.float())
    out, ref = gen(p), gen(rounded)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref, gen(make_pipe(backbone)))  # float8 storage does change the weights


def test_sequential_cpu_offload_is_refused_with_the_alternatives(pipe):
    p = copy.deepcopy(pipe)
    with pytest.raises(NotImplementedError, match="enable_sequential_cpu_offload: .*enable_model_cpu_offload"):
        p.enable_sequential_cpu_offload(device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: offloading to an accelerator")
def test_offloading_to_the_gpu_gives_the_plain_gpu_output(pipe):
    """The real use: enable_model_cpu_offload() (diffusers' default device) and group offloading
    CPU <-> GPU with a stream, each against the plain pipeline on the GPU."""
    plain = copy.deepcopy(pipe).to("cuda")
    ref = gen(plain)
    p = copy.deepcopy(pipe)
    p.enable_model_cpu_offload()
    assert p._execution_device.type == "cuda"
    torch.testing.assert_close(gen(p), ref, rtol=1e-5, atol=1e-5)
    q = copy.deepcopy(pipe)
    for name in ("text_encoder", "image_encoder", "mapper", "vae"):
        getattr(q, name).to("cuda")
    q.backbone.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                    offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    torch.testing.assert_close(gen(q), ref, rtol=1e-5, atol=1e-5)


def test_official_sampling_names_a_missing_component(pipe):
    with pytest.raises(ValueError, match="text_encoder: this pipeline has no text_encoder.*official sampling"):
        vb.VideoBoothPipeline.from_pipe(pipe, text_encoder=None).official_sample(
            "a dog", "dog", torch.rand(3, 16, 16), num_frames=2, num_inference_steps=1, height=16)
