"""The attack core, UAT, HotFlip and GCG on constructed cases: loss masking, candidate scores, threat
models, costs, recomputation (the stages' stored records: test_measured_records.py)."""
import pytest
import torch
import torch.nn.functional as F

from configs.experiment_config import AttackConfig, ModelConfig
from utils.attacks import gcg, hotflip, uat
from utils.attacks.core import Victim, flip_scores, masked_mean, target_mask
from utils.data.tokenization import load_tokenizer
from utils.model.modeling import build_tiny_model
from utils.run.compute import CPU

SMALL = ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=50, context_length=64)


def _model():
    m = build_tiny_model(SMALL, 0).eval()
    m.requires_grad_(False)
    return m


def _plain_target_nll(model, ids, targets):
    """Reference: one unpadded forward, log-softmax by hand, mean over target tokens only."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    vals = [-logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if targets[t]]
    return sum(vals) / len(vals)


def test_masked_loss_counts_only_targets_and_ignores_padding():
    model = _model()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (n,), generator=g) for n in (9, 20, 14)]
    masks = [torch.rand(len(s), generator=g) < 0.6 for s in seqs]
    for m in masks:
        m[0], m[-1] = False, True
    victim = Victim(model, CPU, batch_size=2)             # right-padded together, in two batches
    batched = victim.nll(seqs, masks)
    for s, m, nll in zip(seqs, masks, batched):
        assert masked_mean(nll, m) == pytest.approx(_plain_target_nll(model, s, m), abs=1e-5)
        assert torch.isnan(nll[~m[1:]]).all()              # no logits were computed there
    assert victim.cost.forward_passes == 3 and victim.cost.forward_tokens == 9 + 20 + 14


def test_flip_scores_are_first_order_and_exclude_current_and_special_tokens():
    model = _model()
    ids = torch.randint(1, 50, (12,))
    targets = target_mask(12)
    grad = Victim(model, CPU, 4).grads([ids], [targets])[0]
    E = model.get_input_embeddings().weight
    forbidden = torch.zeros(50, dtype=torch.bool)
    forbidden[0] = True
    pos = torch.tensor([3, 7])
    scores = flip_scores(grad[pos], ids[pos], E, forbidden)
    for r, p in enumerate(pos.tolist()):
        b = (int(ids[p]) + 5) % 49 + 1
        if b != int(ids[p]):
            assert scores[r, b].item() == pytest.approx(((E[b] - E[ids[p]]) @ grad[p]).item(), rel=1e-4, abs=1e-6)
        assert scores[r, ids[p]] == float("-inf") and scores[r, 0] == float("-inf")


def test_embedding_gradient_matches_finite_difference_direction():
    """The gradient predicts the exact loss change of a small embedding step."""
    model = _model()
    ids = torch.randint(1, 50, (10,))
    targets = target_mask(10)
    grad = Victim(model, CPU, 4).grads([ids], [targets])[0]
    emb = model.get_input_embeddings()(ids)
    step = 1e-3 * grad / grad.norm()
    def loss(e):
        with torch.no_grad():
            logits = model(inputs_embeds=e[None]).logits[0]
        return F.cross_entropy(logits[:-1], ids[1:]).item()
    assert loss(emb + step) - loss(emb) == pytest.approx((grad * step).sum().item(), rel=0.05)


def test_uat_trigger_tokens_are_never_targets():
    model = _model()
    text = torch.randint(1, 50, (15,))
    text[0] = 0
    trigger = torch.tensor([7, 8, 9])
    ids, targets = uat.triggered(trigger, text)
    assert ids.tolist() == [0, 7, 8, 9, *text[1:].tolist()]
    assert not targets[:4].any() and targets[4:].all()
    loss, per = uat.mean_loss(Victim(model, CPU, 4), trigger, [text])
    assert loss == pytest.approx(_plain_target_nll(model, ids, targets), abs=1e-5)


def test_hotflip_never_scores_flipped_tokens_and_only_keeps_improving_flips():
    model = _model()
    ids = torch.cat([torch.tensor([0]), torch.randint(1, 50, (20,))])
    forbidden = torch.zeros(50, dtype=torch.bool)
    forbidden[0] = True
    a = AttackConfig(hotflip_max_flips=4, hotflip_top_k=8, hotflip_beam=2, batch_size=16)
    rec = hotflip.attack_text(Victim(model, CPU, a.batch_size), ids, a, forbidden)
    adv = torch.tensor(rec["adversarial_ids"])
    changed = (adv != ids).nonzero().squeeze(1).tolist()
    assert changed == rec["modified_positions"] and 0 not in changed and len(changed) <= 4
    assert not forbidden[adv[changed]].any()
    targets = target_mask(len(ids), changed)
    assert not targets[changed].any()
    assert rec["attacked_nll"] == pytest.approx(_plain_target_nll(model, adv, targets), abs=1e-5)
    assert rec["clean_nll"] == pytest.approx(_plain_target_nll(model, ids, targets), abs=1e-5)
    assert rec["abs_delta_nll"] >= 0 and (rec["n_flips"] == 0 or rec["abs_delta_nll"] > 0)


def _texts(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([0]), torch.randint(1, 50, (length,), generator=g)]) for _ in range(n)]


def test_gcg_keeps_hotflips_threat_model_and_counts_its_cost_exactly():
    model, ids = _model(), _texts(1, 24)[0]
    forbidden = torch.zeros(50, dtype=torch.bool)
    forbidden[[0, 1]] = True
    a = AttackConfig(hotflip_max_flips=3, gcg_steps=6, gcg_search_width=16, gcg_top_k=8, batch_size=8)
    victim = Victim(model, CPU, a.batch_size)
    rec = gcg.attack_text(victim, ids, a, forbidden, torch.Generator().manual_seed(1))
    adv = torch.tensor(rec["adversarial_ids"])
    changed = (adv != ids).nonzero().squeeze(1).tolist()
    assert changed == rec["modified_positions"] and 0 not in changed and 0 < len(changed) <= 3
    assert not forbidden[adv[changed]].any()
    targets = target_mask(len(ids), changed)
    assert rec["attacked_nll"] == pytest.approx(_plain_target_nll(model, adv, targets), abs=1e-5)
    assert rec["clean_nll"] == pytest.approx(_plain_target_nll(model, ids, targets), abs=1e-5)
    assert rec["abs_delta_nll"] > 0
    # One gradient per step; forward: the clean text, at most width distinct swaps per step, the final rescoring.
    c = rec["cost"]
    assert c["gradient_passes"] == 6 and c["gradient_tokens"] == 6 * len(ids)
    # Tokens: every scored sequence's are run or reused (its prefix, over the step's one extra pass of the
    # current sequence but its last token).
    assert 2 + 6 < c["forward_passes"] <= 2 + 6 * 16 and c["reused_tokens"] > 6 * 16
    assert c["forward_tokens"] + c["reused_tokens"] == c["forward_passes"] * len(ids) + 6 * (len(ids) - 1)
    assert c == victim.cost.since(type(victim.cost)())
    # The same generator seed gives the same search (what makes a sharded run equal one process).
    again = gcg.attack_text(Victim(model, CPU, 4), ids, a, forbidden, torch.Generator().manual_seed(1))
    assert again["adversarial_ids"] == rec["adversarial_ids"]


def test_swaps_scored_over_the_reused_prefix_equal_full_passes_and_searches_take_the_same_path():
    model, (ids,) = _model(), _texts(1, 30)
    g = torch.Generator().manual_seed(5)
    seqs, masks = [ids.clone()], [target_mask(31, [4])]        # unchanged; first token; two changes; the last
    for positions in ([1], [7, 20], [30], *([int(torch.randint(1, 31, (1,), generator=g))] for _ in range(12))):
        s = ids.clone()
        s[positions] = (s[positions] + 3) % 49 + 1
        seqs.append(s)
        masks.append(target_mask(31, positions))
    full, reused = Victim(model, CPU, 4, prefix_reuse=False), Victim(model, CPU, 4)
    for a, b in zip(full.nll(seqs, masks), reused.nll(seqs, masks, base=ids)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-6)
    assert reused.cost.forward_tokens < full.cost.forward_tokens and reused.cost.reused_tokens > 0
    forbidden = torch.zeros(50, dtype=torch.bool)
    forbidden[0] = True
    a = AttackConfig(hotflip_max_flips=3, hotflip_top_k=8, gcg_steps=5, gcg_search_width=16, gcg_top_k=8, batch_size=8)
    for attack in (lambda v: hotflip.attack_text(v, ids, a, forbidden),
                   lambda v: gcg.attack_text(v, ids, a, forbidden, torch.Generator().manual_seed(1)),
                   lambda v: gcg.attack_text(v, ids, a, forbidden, torch.Generator().manual_seed(1), "random")):
        one, two = attack(Victim(model, CPU, 8, prefix_reuse=False)), attack(Victim(model, CPU, 8))
        assert one["adversarial_ids"] == two["adversarial_ids"] and one["attacked_nll"] == two["attacked_nll"]
        assert [p[0] for p in one["trace"]] == [p[0] for p in two["trace"]]
        assert [p[1] for p in one["trace"]] == pytest.approx([p[1] for p in two["trace"]], abs=1e-6)


def test_pairs_rescored_in_one_query_equal_each_scored_alone_by_hand():
    model, texts = _model(), _texts(3, 12) + _texts(2, 20, seed=1) + _texts(1, 12, seed=2)
    pairs = []
    for i, t in enumerate(texts):
        adv = t.clone()
        adv[[2, 3 + i]] = (adv[[2, 3 + i]] + 7) % 49 + 1
        pairs.append({"original_ids": t.tolist(), "adversarial_ids": adv.tolist(), "modified_positions": [2, 3 + i]})
    for p, r in zip(pairs, hotflip.rescore(Victim(model, CPU, 4), pairs)):
        targets = target_mask(len(p["original_ids"]), p["modified_positions"])
        assert r["attacked_nll"] == pytest.approx(_plain_target_nll(model, torch.tensor(p["adversarial_ids"]), targets), abs=1e-5)
        assert r["clean_nll"] == pytest.approx(_plain_target_nll(model, torch.tensor(p["original_ids"]), targets), abs=1e-5)
    draw = hotflip.random_flips(texts[0], 3, torch.zeros(50, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert draw == hotflip.random_flips(texts[0], 3, torch.zeros(50, dtype=torch.bool), torch.Generator().manual_seed(0))
    changed = [i for i, (a, b) in enumerate(zip(draw["original_ids"], draw["adversarial_ids"])) if a != b]
    assert changed == draw["modified_positions"] and len(changed) == 3 and 0 not in changed


def test_screened_trigger_losses_are_exact_for_the_kept_candidates_and_cost_less():
    model, texts = _model(), _texts(6, 10)
    g = torch.Generator().manual_seed(3)
    triggers = [torch.randint(2, 50, (3,), generator=g) for _ in range(10)]
    full_victim, screened_victim = Victim(model, CPU, 16), Victim(model, CPU, 16)
    full = uat.trigger_losses(full_victim, triggers, texts)
    screened = uat.trigger_losses(screened_victim, triggers, texts, screen=2, keep=3)
    kept = [i for i, l in enumerate(screened) if l != float("-inf")]
    assert len(kept) == 3
    for i in kept:
        assert screened[i] == pytest.approx(full[i], abs=1e-6)
        assert full[i] == pytest.approx(sum(_plain_target_nll(model, *uat.triggered(triggers[i], t))
                                            for t in texts) / len(texts), abs=1e-5)
    assert full_victim.cost.forward_passes == 10 * 6
    assert screened_victim.cost.forward_passes == 10 * 2 + 3 * 4
    # the kept ones are the best on the screening texts
    head = [sum(p) for p in uat.per_text_losses(Victim(model, CPU, 16), triggers, texts[:2])]
    assert set(kept) == set(sorted(range(10), key=lambda i: -head[i])[:3])


@pytest.mark.parametrize("search", ["beam", "gcg"])
def test_trigger_searches_report_a_loss_that_recomputes(search):
    model, texts = _model(), _texts(4, 12)
    forbidden = torch.zeros(50, dtype=torch.bool)
    forbidden[0] = True
    a = AttackConfig(uat_trigger_len=3, uat_restarts=2, uat_max_sweeps=2, uat_top_k=4, uat_beam=1, uat_search=search,
                     gcg_steps=4, gcg_search_width=8, gcg_top_k=4, uat_screen_texts=2, uat_screen_keep=3)
    victim = Victim(model, CPU, 16)
    found = uat.find_trigger(victim, texts, a, forbidden, seed=0, init_token=5)
    clean, _ = uat.mean_loss(Victim(model, CPU, 16), torch.tensor([], dtype=torch.long), texts)
    assert found["loss"] == pytest.approx(uat.mean_loss(Victim(model, CPU, 3), found["trigger"], texts)[0], abs=1e-6)
    assert found["loss"] > clean and not forbidden[found["trigger"]].any()
    assert found["cost"]["forward_passes"] == victim.cost.forward_passes > 0 and found["cost"]["gradient_passes"] > 0


def test_forbidden_tokens_cover_added_special_tokens_without_a_role(tmp_path):
    """GPT-NeoX-20B's layout: <|endoftext|> = 0 (eos), <|padding|> = 1 marked special but with no
    named role, so transformers 5's all_special_ids omits it; attacks must still never insert it."""
    from utils.attacks.core import forbidden_tokens
    from utils.data.tokenization import train_bpe
    texts = ["the quick brown fox jumps over the lazy dog " * 3] * 40
    train_bpe(texts, 300, special_tokens=("<|endoftext|>", "<|padding|>")).save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert 1 not in tok.all_special_ids and tok.convert_ids_to_tokens(1) == "<|padding|>"
    rows = len(tok) + 20                                   # embedding rows padded past the tokenizer
    f = forbidden_tokens(tok, rows)
    assert f[0] and f[1] and f[len(tok):].all() and not f[2:len(tok)].any()
