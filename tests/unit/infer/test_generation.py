"""Generation correctness on tiny random models (CPU, fp32): our `generate` (the LLM's transformers generate on
image embeddings, left-padded batches) equals step-by-step argmax of our own forward (the training forward, right
padding, no cache), and equals the LLM's own generate on the same prompt; decoding knobs do what they say."""
import numpy as np
import pytest
import torch

from raytune_minicpmv.infer.generation import (GenerationSettings, cut_at_stop, generate, load_for_inference,
                                               stop_token_ids)
from raytune_minicpmv.infer.prompts import Prompt, prompt_batch, prompt_of, prompt_rows, table_rows

STEPS = 5


def _tiny(family, tmp_path_factory):
    from raytune_minicpmv.data.records import read_raw_records
    from raytune_minicpmv.data.sample_data import write_sample_dataset
    from raytune_minicpmv.models import build_tiny

    root = tmp_path_factory.mktemp(family)
    ckpt = build_tiny(family, root / "ckpt", max_slice_nums=2)
    model, tok, spec = load_for_inference(ckpt, device="cpu")
    # two images; a multi-turn record with a sliced image (3 crops); text only: three lengths, left-padded together
    raws = list(read_raw_records(write_sample_dataset(root / "data", "eval")))[2:5]
    rows, has = prompt_rows(raws, spec, tok, max_length=1024)
    prompts = [prompt_of(r, h) for r, h in zip(table_rows(rows), has)]
    return model, tok, prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny("minicpmv2_6", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny25(tmp_path_factory):
    return _tiny("minicpmv2_5", tmp_path_factory)


def stepwise_argmax(model, p: Prompt, steps: int, stops: list[int]) -> list[int]:
    """Greedy decoding with the training forward: the whole sequence again at every step, argmax of the last."""
    ids = list(p.input_ids)
    for _ in range(steps):
        batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.arange(len(ids))[None],
                 "pixel_values": [list(p.pixel_values)], "tgt_sizes": [torch.from_numpy(p.tgt_sizes)],
                 "image_bound": [torch.from_numpy(p.image_bound)]}
        with torch.no_grad():
            nxt = int(model(batch).logits[0, -1].argmax())
        if nxt in stops:
            break
        ids.append(nxt)
    return ids[len(p.input_ids):]


@pytest.mark.parametrize("family", ["tiny", "tiny25"])
def test_greedy_batch_equals_stepwise_argmax_of_our_forward(family, request):
    model, tok, prompts = request.getfixturevalue(family)
    assert sorted(len(p.pixel_values) for p in prompts)[-1] >= 2 and any(not p.pixel_values for p in prompts)
    assert len({len(p.input_ids) for p in prompts}) > 1  # the batch is left-padded
    stops = stop_token_ids(tok.tokenizer)
    ours = generate(model, prompt_batch(prompts), GenerationSettings(max_new_tokens=STEPS), stops)
    ref = [stepwise_argmax(model, p, STEPS, stops) for p in prompts]
    assert ours == ref
    assert sum(len(r) for r in ref) >= 2 * len(prompts)  # the comparison covers real tokens, not only stops


def test_generate_equals_the_llm_generate_on_the_same_embeddings_and_on_text_ids(tiny):
    model, tok, prompts = tiny
    stops = stop_token_ids(tok.tokenizer)
    settings = GenerationSettings(max_new_tokens=STEPS)
    for p in prompts:
        b = prompt_batch([p])
        emb = model.embed_inputs(b["input_ids"], b["pixel_values"], b["tgt_sizes"], b["image_bound"])
        ref = model.llm.generate(inputs_embeds=emb, attention_mask=b["attention_mask"],
                                 generation_config=settings.hf_config(stops, 0))[0].tolist()
        assert generate(model, b, settings, stops) == [cut_at_stop(ref, stops)]
    text = next(p for p in prompts if not p.pixel_values)  # no image: the LLM on token ids is the same model
    ids = torch.from_numpy(text.input_ids)[None]
    ref = model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=settings.hf_config(stops, 0))[0, ids.shape[1]:].tolist()
    assert generate(model, prompt_batch([text]), settings, stops) == [cut_at_stop(ref, stops)]


def test_an_extra_stop_token_ends_the_answer_before_it(tiny):
    model, tok, prompts = tiny
    stops = stop_token_ids(tok.tokenizer)
    b = prompt_batch(prompts[:1])
    full = generate(model, b, GenerationSettings(max_new_tokens=STEPS), stops)[0]
    assert len(full) >= 3
    k = next(i for i, t in enumerate(full) if t not in full[:i])  # the first occurrence of its token
    k = max(k, 2) if full[2] not in full[:2] else k
    cut = generate(model, b, GenerationSettings(max_new_tokens=STEPS), stop_token_ids(tok.tokenizer, (full[k],)))[0]
    assert cut == full[:full.index(full[k])]


def test_repetition_penalty_and_sampling_knobs(tiny):
    model, tok, prompts = tiny
    stops = stop_token_ids(tok.tokenizer)
    b = prompt_batch([p for p in prompts if not p.pixel_values])  # the knobs act on the LLM: text is enough
    greedy = generate(model, b, GenerationSettings(max_new_tokens=12), stops)
    assert any(len(set(g)) < len(g) for g in greedy)  # a random model repeats itself...
    penalized = generate(model, b, GenerationSettings(max_new_tokens=12, repetition_penalty=1e4), stops)
    repeats = lambda seqs: sum(len(g) - len(set(g)) for g in seqs)  # noqa: E731
    assert repeats(penalized) < repeats(greedy)  # ...less with a penalty
    # top_k=1 sampling is greedy whatever the temperature; seeded sampling is reproducible and differs from greedy
    assert generate(model, b, GenerationSettings(max_new_tokens=12, do_sample=True, top_k=1, temperature=5.0,
                                                 seed=1), stops) == greedy
    hot = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=50.0, top_p=1.0, top_k=0, seed=3)
    first, again = generate(model, b, hot, stops), generate(model, b, hot, stops)
    assert first == again and first != greedy


def test_stop_tokens_of_the_real_26_tokenizer():
    from raytune_minicpmv.data.templates import TokenizerInfo

    tok = TokenizerInfo.load("tests/assets/minicpmv26_tokenizer").tokenizer
    ids = stop_token_ids(tok)
    assert {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")} <= set(ids)
    assert tok.eos_token_id == ids[0] and tok.unk_token_id not in ids
    assert cut_at_stop([5, 6, ids[1], 7], ids) == [5, 6] and cut_at_stop([5, 6], ids) == [5, 6]


def test_settings_from_config_override_only_given_fields():
    from raytune_minicpmv.config import GenerateConfig

    s = GenerationSettings.from_config(GenerateConfig(max_new_tokens=9, top_k=5), do_sample=True, top_k=None)
    assert (s.max_new_tokens, s.do_sample, s.top_k, s.temperature) == (9, True, 5, 0.7)
    hf = s.hf_config([7, 8], 0)
    assert hf.do_sample and hf.top_k == 5 and hf.eos_token_id == [7, 8] and hf.max_new_tokens == 9
    assert not GenerationSettings().hf_config([7], 0).do_sample
