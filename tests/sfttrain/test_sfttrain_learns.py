"""It learns the right thing: trained from scratch on five packed pairs, the model answers each
prompt with its completion and then stops (EOS)."""

from sfttrain import train
from tests.sfttrain_helpers import SPANISH, one_thread, spanish_shards, tiny_model, train_config  # noqa: F401


def test_tiny_llama_learns_the_completions_and_to_stop(tiny_model, spanish_shards, tmp_path, one_thread):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = train_config(spanish_shards, tiny_model, tmp_path / "run", method="full", max_steps=80,
                          learning_rate=3e-3, lr_scheduler="constant", logging_steps=10)
    result = train(config, disable_tqdm=True)
    last_loss = [h["loss"] for h in result.log_history if "loss" in h][-1]
    assert last_loss < 0.05

    tok = AutoTokenizer.from_pretrained(result.final_dir)  # the tokenizer was saved with the model
    model = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    for prompt, completion in SPANISH:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        assert new[-1] == tok.eos_token_id, f"{prompt!r} did not stop: {tok.decode(new)!r}"
        assert tok.decode(new[:-1]) == completion.strip(), prompt
