"""Generation correctness for MiniCPM-V 4.6 / 4.7 on tiny random models (CPU, fp32): `generate` (transformers' own
`generate` of the native class on a left-padded processor batch: images encoded once, hybrid KV / linear-attention
cache, 4.7's canvas M-RoPE) equals step-by-step argmax of our own training forward (`models.forward.forward_logits`,
no cache, the whole sequence again at each step); the decoding knobs do what they say."""
import pytest
import torch

from raytune_minicpmv.infer.generation import GenerationSettings, generate, load_for_inference, stop_token_ids
from raytune_minicpmv.infer.prompts import prompt_batch, prompt_of, prompt_rows, table_rows
from raytune_minicpmv.infer.prompts4 import Prompt4
from raytune_minicpmv.models.forward import forward_logits

STEPS = 4


def _setup(ckpt, tmp_path_factory):
    from raytune_minicpmv.data.records import read_raw_records
    from raytune_minicpmv.data.sample_data import write_sample_dataset

    model, info, spec = load_for_inference(ckpt, device="cpu")
    # two images; a multi-turn record with a sliced image; text only: three lengths, left-padded together
    raws = list(read_raw_records(write_sample_dataset(tmp_path_factory.mktemp("data4"), "eval")))[2:5]
    rows, has = prompt_rows(raws, spec, info, max_length=1024)
    return model, info, spec, [prompt_of(r, h) for r, h in zip(table_rows(rows), has)]


@pytest.fixture(scope="module")
def setup46(gen46, tmp_path_factory):
    return _setup(gen46, tmp_path_factory)


@pytest.fixture(scope="module")
def setup47(gen47, tmp_path_factory):
    return _setup(gen47, tmp_path_factory)


def stepwise_argmax(model, family: str, p: Prompt4, steps: int, stops: list[int]) -> tuple[list[int], list]:
    """Greedy decoding with the training forward on the unpadded prompt: the whole sequence at every step. Returns
    the new ids and each step's next-token logits."""
    ids, logits = list(p.input_ids), []
    for _ in range(steps):
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if len(p.target_sizes):
            batch["pixel_values"] = torch.from_numpy(p.pixel_values[None])
            batch["target_sizes"] = torch.from_numpy(p.target_sizes)
        if p.mm_token_type_ids is not None:  # 4.7: generated tokens are text (0)
            batch["mm_token_type_ids"] = torch.tensor([list(p.mm_token_type_ids) + [0] * (len(ids) - len(p.input_ids))])
        with torch.no_grad():
            logits.append(forward_logits(model, batch, family)[0, -1])
        nxt = int(logits[-1].argmax())
        if nxt in stops:
            break
        ids.append(nxt)
    return ids[len(p.input_ids):], logits


@pytest.mark.parametrize("fixture,family", [("setup46", "minicpmv4_6"), ("setup47", "minicpmv4_7")])
def test_greedy_batch_equals_stepwise_argmax_of_our_forward(fixture, family, request):
    model, info, spec, prompts = request.getfixturevalue(fixture)
    assert type(model).__name__.startswith("MiniCPMV4_")  # transformers' class: its own generate
    crops = sorted(len(p.target_sizes) for p in prompts)
    assert crops[0] == 0 and crops[-1] >= 3  # a text-only prompt and one with several crops (slices)
    assert len({len(p.input_ids) for p in prompts}) == 3  # the batch is left-padded
    assert (prompts[0].mm_token_type_ids is not None) == (family == "minicpmv4_7")
    stops, settings = stop_token_ids(info.tokenizer), GenerationSettings(max_new_tokens=STEPS)
    batch = prompt_batch(prompts, downsample_mode=spec.downsample_mode)
    ours = generate(model, batch, settings, stops, pad_id=info.pad_token_id)
    ref = [stepwise_argmax(model, family, p, STEPS, stops) for p in prompts]
    assert ours == [ids for ids, _ in ref]
    assert sum(len(r) for r, _ in ref) >= 2 * len(prompts) and len({tuple(r) for r, _ in ref}) > 1  # varied tokens
    # and each step's logits, not only their argmax: positions under left padding (4.7: the canvas M-RoPE), the
    # cache and the image features agree with the training forward to float32 rounding
    with torch.no_grad():
        out = model.generate(**batch, generation_config=settings.hf_config(stops, info.pad_token_id),
                             output_logits=True, return_dict_in_generate=True)
    for i, (_, logits) in enumerate(ref):
        for t, want in enumerate(logits):
            torch.testing.assert_close(out.logits[t][i], want, rtol=1e-4, atol=1e-4)


def test_images_reach_the_prompt_the_model_decodes_from(setup46):
    """Other pixels, other next-token logits of the batch generate decodes from (the features are scattered in)."""
    model, info, spec, prompts = setup46
    p = min((q for q in prompts if len(q.target_sizes)), key=lambda q: q.pixel_values.shape[-1])
    flipped = Prompt4(p.id, p.input_ids, -p.pixel_values, p.target_sizes, p.mm_token_type_ids, p.reference_ids)
    with torch.no_grad():
        logits = [model(**prompt_batch([q]), use_cache=False).logits[0, -1] for q in (p, flipped)]
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_sampling_knobs(setup46):
    model, info, spec, prompts = setup46
    stops = stop_token_ids(info.tokenizer)
    b = prompt_batch([p for p in prompts if not len(p.target_sizes)])  # the knobs act on the LLM: text is enough
    greedy = generate(model, b, GenerationSettings(max_new_tokens=8), stops)
    assert len(greedy[0]) == 8  # max_new_tokens (no stop token in a random answer this short)
    # top_k=1 sampling is greedy whatever the temperature; seeded sampling is reproducible and differs from greedy
    assert generate(model, b, GenerationSettings(max_new_tokens=8, do_sample=True, top_k=1, temperature=5.0,
                                                 seed=1), stops) == greedy
    hot = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=50.0, top_p=1.0, top_k=0, seed=3)
    first, again = generate(model, b, hot, stops), generate(model, b, hot, stops)
    assert first == again and first != greedy
    cut = generate(model, b, GenerationSettings(max_new_tokens=8), stop_token_ids(info.tokenizer, (greedy[0][3],)))
    assert cut == [greedy[0][:greedy[0].index(greedy[0][3])]]  # an extra stop token ends the answer before it
