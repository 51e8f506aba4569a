//! Parity of the libtorch LM with HF transformers on tiny random models of every supported
//! architecture variant (fixtures: `tests/fixtures/lm/make_fixtures.py`). The models run on
//! `$RECONTROL_TEST_DEVICE` (default `cpu`; e.g. `cuda:0` on a GPU machine).

use recontrol_lm::config::RopeScaling;
use recontrol_lm::{
    generate, ChatMessage, DType, DeviceSpec, HiddenStateHook, HookContext, HookError,
    LanguageModel, Positions, PromptBatch, RowProgress, Sampling, StepInput,
};
use recontrol_tests::{lm_expected, lm_fixture, lm_fixtures_root, lm_prompts, LM_FIXTURES};
use tch::{Kind, Tensor};

const PAD: i64 = 3;
const EOS: i64 = 2;

fn device_spec() -> DeviceSpec {
    std::env::var("RECONTROL_TEST_DEVICE")
        .map(|d| d.parse().expect("RECONTROL_TEST_DEVICE: cpu or cuda:N"))
        .unwrap_or(DeviceSpec::Cpu)
}

fn device() -> tch::Device {
    device_spec().resolve().expect("device")
}

fn load(name: &str, dtype: DType) -> LanguageModel {
    LanguageModel::load(&lm_fixture(name), device_spec(), dtype)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn tokenize(lm: &LanguageModel) -> Vec<Vec<i64>> {
    lm_prompts()
        .iter()
        .map(|p| lm.tokenizer.encode(p, true).expect("tokenise"))
        .collect()
}

/// HF's new tokens of one row: up to and including the first eos (the rest is padding).
fn hf_row(t: &Tensor) -> Vec<i64> {
    let row = Vec::<i64>::try_from(t.flatten(0, -1)).expect("int64 row");
    match row.iter().position(|&x| x == EOS) {
        Some(i) => row[..=i].to_vec(),
        None => row,
    }
}

fn max_abs_diff_on_mask(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    // mask [batch, seq] -> [batch, seq, 1]
    let m = mask.to_kind(Kind::Bool).unsqueeze(-1);
    (a - b)
        .abs()
        .masked_fill(&m.logical_not(), 0.0)
        .max()
        .double_value(&[])
}

#[test]
fn tokenizer_matches_hf() {
    for name in LM_FIXTURES {
        let lm = load(name, DType::F32);
        let path = lm_fixture(name).join("expected_tokens.json");
        let text = std::fs::read_to_string(&path).expect("expected_tokens.json");
        let expected: Vec<Vec<i64>> = serde_json::from_str(&text).expect("token lists");
        assert_eq!(tokenize(&lm), expected, "{name}");
        let decoded = lm.tokenizer.decode(&expected[0], true).expect("decode");
        assert_eq!(decoded, lm_prompts()[0], "{name}: decode(encode(x)) == x");
    }
}

#[test]
fn hidden_states_and_logits_match_hf() {
    for name in LM_FIXTURES {
        let lm = load(name, DType::F32);
        let exp: std::collections::HashMap<String, Tensor> = lm_expected(name)
            .into_iter()
            .map(|(k, t)| (k, t.to_device(device())))
            .collect();
        let ids = &exp["input_ids"];
        let mask = &exp["attention_mask"];
        // Positions as HF generate computes them for left padding.
        let positions = (mask.cumsum(-1, Kind::Int64) - 1).masked_fill(&mask.eq(0), 1);
        let key_mask = mask.to_kind(Kind::Bool);
        let mut cache = lm.model.new_cache(ids.size()[1] as usize);
        let input = StepInput {
            input_ids: ids,
            position_ids: &positions,
            key_mask: Some(&key_mask),
        };
        let hidden = lm
            .model
            .forward_hidden(&input, &mut cache, Positions::All)
            .expect("forward");
        let logits = lm.model.logits(&hidden).expect("logits");
        let dh = max_abs_diff_on_mask(&hidden, &exp["hidden"], mask);
        let dl = max_abs_diff_on_mask(&logits, &exp["logits"], mask);
        println!("{name}: max |hidden - hf| = {dh:.2e}, max |logits - hf| = {dl:.2e}");
        assert!(dh < 1e-4, "{name}: hidden differs from HF by {dh}");
        assert!(dl < 1e-4, "{name}: logits differ from HF by {dl}");

        // The last-position call (on the CPU, a packed prefill: the rows' real tokens without
        // their padding) returns the states of the all-positions call (the padded pass), up to
        // the rounding of products of other shapes.
        let mut cache = lm.model.new_cache(ids.size()[1] as usize);
        let last = lm
            .model
            .forward_hidden(&input, &mut cache, Positions::Last)
            .expect("forward");
        let d = (last - hidden.select(1, -1)).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{name}: Positions::Last differs by {d}");
    }
}

/// The cache a packed prefill leaves (each row's keys right-aligned, zeros at the padding)
/// serves the next steps as the padded pass's cache does: the states of two decoding steps
/// after each agree, row by row, with rows of different lengths in the batch.
#[test]
fn a_packed_prefill_leaves_the_cache_of_a_padded_one() {
    for name in LM_FIXTURES {
        let lm = load(name, DType::F32);
        let prompts = tokenize(&lm);
        assert!(
            prompts.iter().any(|p| p.len() != prompts[0].len()),
            "{name}: the prompts should differ in length"
        );
        let config = lm.generation_config(2, Sampling::Greedy);
        let batch = PromptBatch::new(&lm.model, &prompts, &config).expect("batch");
        let input = batch.input();
        let next = |cache: &mut recontrol_lm::KvCache, first: Tensor| -> Vec<Tensor> {
            let mut rows = RowProgress::new(&batch, &config);
            let mut states = vec![first];
            for token in [5i64, 7] {
                let fed = rows.advance(&vec![token; prompts.len()]).expect("advance");
                let h = lm
                    .model
                    .forward_hidden(&fed.input(), cache, Positions::Last)
                    .expect("step");
                states.push(h);
            }
            states
        };
        // Positions::All takes the padded pass; Positions::Last the packed one.
        let mut padded = lm.model.new_cache(batch.width + 2);
        let all = lm
            .model
            .forward_hidden(&input, &mut padded, Positions::All)
            .expect("padded prefill");
        let mut packed = lm.model.new_cache(batch.width + 2);
        let last = lm
            .model
            .forward_hidden(&input, &mut packed, Positions::Last)
            .expect("packed prefill");
        assert_eq!(packed.len(), padded.len(), "{name}: cache lengths");
        let a = next(&mut padded, all.select(1, -1));
        let b = next(&mut packed, last);
        for (step, (a, b)) in a.iter().zip(&b).enumerate() {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-5, "{name}: step {step} differs by {d}");
        }
    }
}

/// A prompt fed in two chunks (the second several tokens after cached ones, no padding) gives
/// the states of one pass: the second chunk's queries see the cache and only earlier tokens.
#[test]
fn a_prompt_fed_in_two_chunks_matches_one_pass() {
    for name in LM_FIXTURES {
        let lm = load(name, DType::F32);
        let ids = tokenize(&lm)
            .into_iter()
            .max_by_key(Vec::len)
            .expect("a prompt");
        let n = ids.len() as i64;
        assert!(n >= 4, "{name}: prompt too short to split");
        let all = Tensor::from_slice(&ids).view([1, n]).to_device(device());
        let positions = Tensor::arange(n, (Kind::Int64, device())).view([1, n]);
        let run = |from: i64, to: i64, cache: &mut recontrol_lm::KvCache| {
            let input = StepInput {
                input_ids: &all.narrow(1, from, to - from),
                position_ids: &positions.narrow(1, from, to - from),
                key_mask: None,
            };
            lm.model
                .forward_hidden(&input, cache, Positions::All)
                .expect("forward")
        };
        let whole = run(0, n, &mut lm.model.new_cache(n as usize));
        let split = n / 2;
        let mut cache = lm.model.new_cache(n as usize);
        let _ = run(0, split, &mut cache);
        let tail = run(split, n, &mut cache);
        let d = (tail - whole.narrow(1, split, n - split))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-5, "{name}: the second chunk differs by {d}");
    }
}

#[test]
fn greedy_generation_matches_hf_batched_and_alone() {
    for name in LM_FIXTURES {
        let lm = load(name, DType::F32);
        let exp = lm_expected(name);
        let prompts = tokenize(&lm);
        let config = lm.generation_config(32, Sampling::Greedy);
        let batch = generate(&lm.model, &prompts, &config, None).expect("generate");
        for (i, prompt) in prompts.iter().enumerate() {
            let hf_batch = hf_row(&exp["greedy_batch"].get(i as i64));
            let hf_single = hf_row(&exp[&format!("greedy_single_{i}")]);
            assert_eq!(batch[i].tokens, hf_batch, "{name}: prompt {i} in a batch");
            let alone = generate(&lm.model, std::slice::from_ref(prompt), &config, None)
                .expect("generate alone");
            assert_eq!(alone[0].tokens, hf_single, "{name}: prompt {i} alone");
            let reason = if hf_single.last() == Some(&EOS) {
                "eos"
            } else {
                "length"
            };
            assert_eq!(
                alone[0].finish_reason.as_str(),
                reason,
                "{name}: prompt {i}"
            );
        }
    }
}

/// The LongRoPE fixture whose generations cross `original_max_position_embeddings`.
const CROSSING: &str = "phi3-crossing";

fn original_max_position_embeddings(lm: &LanguageModel) -> i64 {
    match &lm.model.config().rope.scaling {
        RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } => *original_max_position_embeddings as i64,
        other => panic!("{CROSSING}: not LongRoPE: {other:?}"),
    }
}

/// Max |logits - HF| of the greedy steps of the batch before and after it crosses
/// `original_max_position_embeddings`, and the number of steps after: the prompts prefilled
/// into a cache of `copies` copies of each row, then `step_hidden(step, hf_tokens, rows,
/// cache)` feeds HF's tokens of a step and returns the rows' final hidden states
/// `[batch, hidden]`.
fn step_logit_diffs(
    lm: &LanguageModel,
    copies: usize,
    mut step_hidden: impl FnMut(usize, &[i64], &mut RowProgress, &mut recontrol_lm::KvCache) -> Tensor,
) -> (f64, f64, usize) {
    let exp = lm_expected(CROSSING);
    let hf_tokens = &exp["greedy_batch"]; // [batch, 32]
    let hf_logits = exp["greedy_batch_logits"].to_device(device()); // [steps, batch, vocab]
    let config = lm.generation_config(32, Sampling::Greedy);
    let batch = PromptBatch::new(&lm.model, &tokenize(lm), &config).expect("batch");
    let mut rows = RowProgress::new(&batch, &config);
    let mut prefix = lm.model.new_cache(batch.width + 32);
    let mut hidden = lm
        .model
        .forward_hidden(&batch.input(), &mut prefix, Positions::Last)
        .expect("prefill");
    let mut cache = prefix.repeat_rows(copies).expect("copies");
    let original = original_max_position_embeddings(lm);
    let (mut before, mut after, mut steps_after) = (0f64, 0f64, 0);
    for step in 0..hf_logits.size()[0] {
        let logits = lm.model.logits(&hidden).expect("logits");
        let d = (logits - hf_logits.get(step)).abs().max().double_value(&[]);
        // These logits come from the pass that reached position width + step - 1.
        if batch.width as i64 + step > original {
            after = after.max(d);
            steps_after += 1;
        } else {
            before = before.max(d);
        }
        let next = Vec::<i64>::try_from(hf_tokens.select(1, step)).expect("tokens");
        if rows.record(&next) {
            break;
        }
        hidden = step_hidden(step as usize, &next, &mut rows, &mut cache);
    }
    (before, after, steps_after)
}

/// Phi-3's LongRoPE across `original_max_position_embeddings`: fed HF's tokens, the model gives
/// HF's logits at every greedy step, before the batch crosses it and after (where transformers
/// runs the whole sequence again and `forward_hidden` does too). HF's tokens are not those of a
/// cache kept across the crossing, so the greedy parity above fails without the re-run.
#[test]
fn longrope_logits_match_hf_across_the_crossing() {
    let lm = load(CROSSING, DType::F32);
    let (before, after, steps_after) = step_logit_diffs(&lm, 1, |_, next, rows, cache| {
        let fed = rows.advance(next).expect("advance");
        lm.model
            .forward_hidden(&fed.input(), cache, Positions::Last)
            .expect("step")
    });
    println!("{CROSSING}: max |logits - hf| before the crossing {before:.2e}, after {after:.2e}");
    assert!(before < 1e-4 && after < 1e-4, "{before} {after}");
    assert!(steps_after > 0, "no step after the crossing");
    let exp = lm_expected(CROSSING);
    let rows = |key: &str| -> Vec<Vec<i64>> {
        (0..exp[key].size()[0])
            .map(|i| hf_row(&exp[key].get(i)))
            .collect()
    };
    assert_ne!(rows("greedy_batch"), rows("greedy_batch_kept_cache"));
}

/// The row copies of the reranking methods ([`recontrol_lm::KvCache::repeat_rows`],
/// [`recontrol_lm::KvCache::copy_rows`]) keep the tokens that the re-run at the crossing
/// needs: two candidates per row, HF's token and another, the chosen copy alternating; the
/// chosen copies give HF's logits at every step.
#[test]
fn reranking_row_copies_rerun_the_chosen_tokens_at_the_crossing() {
    let lm = load(CROSSING, DType::F32);
    let vocab = lm.model.config().vocab_size as i64;
    let (before, after, _) = step_logit_diffs(&lm, 2, |step, next, rows, cache| {
        rows.advance_position().expect("advance");
        let chosen = step % 2;
        let candidates: Vec<i64> = next
            .iter()
            .flat_map(|&t| {
                let other = (t + 1) % vocab;
                if chosen == 0 {
                    [t, other]
                } else {
                    [other, t]
                }
            })
            .collect();
        let input = rows.step_tokens(&candidates, 2).expect("candidates");
        let hidden = lm
            .model
            .forward_hidden(&input.input(), cache, Positions::Last)
            .expect("step");
        let picked: Vec<i64> = (0..next.len() as i64)
            .map(|r| 2 * r + chosen as i64)
            .collect();
        let picked = Tensor::from_slice(&picked).to_device(device());
        let source = picked.repeat_interleave_self_int(2, 0, None::<i64>);
        let at = cache.len() - 1;
        cache.copy_rows(&source, at).expect("copy rows");
        hidden.index_select(0, &picked)
    });
    println!(
        "{CROSSING} with row copies: max |logits - hf| before {before:.2e}, after {after:.2e}"
    );
    assert!(before < 1e-4 && after < 1e-4, "{before} {after}");
}

#[test]
fn chat_template_renders_like_hf() {
    let path = lm_fixtures_root().join("prompts.json");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("prompts.json")).expect("json");
    let messages: Vec<ChatMessage> =
        serde_json::from_value(value["chat_messages"].clone()).expect("messages");
    let lm = load("llama3-gqa", DType::F32);
    let rendered = lm
        .tokenizer
        .apply_chat_template(&messages, true)
        .expect("render");
    assert_eq!(rendered, value["chat_rendered"].as_str().expect("string"));
    // Rendered text carries its own <s>: encoded without special tokens there is exactly one
    // (as HF's apply_chat_template(tokenize=True)); with them, the post-processor adds another.
    let (ids, cut) = lm.encode_prompt(&rendered, 4, false).expect("encode");
    assert!(!cut);
    assert_eq!((ids[0], ids[1] != 1), (1, true), "{ids:?}");
    let (doubled, _) = lm.encode_prompt(&rendered, 4, true).expect("encode");
    assert_eq!(&doubled[..2], &[1, 1]);
    let plain = load("llama-mha", DType::F32);
    let err = plain
        .tokenizer
        .apply_chat_template(&messages, true)
        .expect_err("no template");
    assert!(err.to_string().contains("has no chat template"), "{err}");
}

#[test]
fn half_precision_tracks_f32() {
    for dtype in [DType::Bf16, DType::F16] {
        let lm32 = load("llama3-gqa", DType::F32);
        let lm16 = load("llama3-gqa", dtype);
        let exp = lm_expected("llama3-gqa");
        let ids = exp["input_ids"].get(1).unsqueeze(0).to_device(device()); // the short prompt, unpadded below
        let mask = exp["attention_mask"].get(1);
        let n = mask.sum(Kind::Int64).int64_value(&[]);
        let ids = ids.narrow(1, ids.size()[1] - n, n);
        let pos = Tensor::arange(n, (Kind::Int64, device())).unsqueeze(0);
        let run = |lm: &LanguageModel| {
            let mut cache = lm.model.new_cache(n as usize);
            let input = StepInput {
                input_ids: &ids,
                position_ids: &pos,
                key_mask: None,
            };
            let h = lm
                .model
                .forward_hidden(&input, &mut cache, Positions::All)
                .expect("forward");
            lm.model.logits(&h).expect("logits").to_kind(Kind::Float)
        };
        let (a, b) = (run(&lm32), run(&lm16));
        assert_eq!(b.size(), a.size());
        let scale = a.abs().max().double_value(&[]);
        let diff = (&a - &b).abs().max().double_value(&[]);
        assert!(
            diff < 0.05 * scale,
            "{dtype}: max diff {diff} vs scale {scale}"
        );
        let agree = a
            .argmax(-1, false)
            .eq_tensor(&b.argmax(-1, false))
            .to_kind(Kind::Float)
            .mean(Kind::Float);
        assert!(
            agree.double_value(&[]) > 0.8,
            "{dtype}: argmax agreement {agree}"
        );
    }
}

/// Forces every generated token to `target` by replacing the hidden state with that token's
/// output embedding, scaled up; records which rows it was called with.
struct ForceToken {
    direction: Tensor,
    calls: Vec<Vec<usize>>,
}

impl HiddenStateHook for ForceToken {
    fn apply(&mut self, ctx: &HookContext<'_>, hidden: Tensor) -> Result<Tensor, HookError> {
        self.calls.push(ctx.rows.to_vec());
        Ok(self.direction.unsqueeze(0).expand_as(&hidden).contiguous())
    }
}

#[test]
fn hook_replaces_the_state_the_logits_come_from() {
    let lm = load("qwen2", DType::F32); // its four prompts stop at different steps
    let prompts = tokenize(&lm);
    let config = lm.generation_config(8, Sampling::Greedy);
    let plain = generate(&lm.model, &prompts, &config, None).expect("plain");
    let target = 77i64;
    // lm_head(h) = W h; h = 100 * W[target] makes `target` the argmax (its logit is 100 |w|^2).
    let w = lm
        .model
        .logits(&Tensor::eye(64, (Kind::Float, device())))
        .expect("W^T");
    let direction = w.select(1, target) * 100.0;
    let mut hook = ForceToken {
        direction,
        calls: Vec::new(),
    };
    let forced = generate(&lm.model, &prompts, &config, Some(&mut hook)).expect("forced");
    for row in &forced {
        assert_eq!(row.tokens, vec![target; 8]);
    }
    assert_eq!(hook.calls.len(), 8);
    assert!(hook.calls.iter().all(|rows| rows == &[0, 1, 2, 3]));
    // Plain runs stop rows at eos: their hook calls would skip finished rows, checked here
    // by a hook that changes nothing.
    struct Record(Vec<Vec<usize>>);
    impl HiddenStateHook for Record {
        fn apply(&mut self, ctx: &HookContext<'_>, hidden: Tensor) -> Result<Tensor, HookError> {
            self.0.push(ctx.rows.to_vec());
            Ok(hidden)
        }
    }
    let mut record = Record(Vec::new());
    let observed = generate(&lm.model, &prompts, &config, Some(&mut record)).expect("observed");
    assert_eq!(observed, plain, "an identity hook changes nothing");
    for (step, rows) in record.0.iter().enumerate() {
        let expected: Vec<usize> = (0..4).filter(|&r| plain[r].tokens.len() > step).collect();
        assert_eq!(rows, &expected, "step {step}");
    }
    assert_ne!(PAD, target);
}

/// Loading for inference joins q/k/v and gate/up and (on the CPU) stores the layers' matrices
/// `[in, out]`: every parameter still reads back under its checkpoint name and shape with the
/// checkpoint's values (a backbone load keeps the checkpoint's layout), and the joined maps
/// are really in use (fewer parameter tensors of their own).
#[test]
fn the_inference_layout_keeps_the_checkpoints_parameters() {
    for name in LM_FIXTURES {
        let dir = lm_fixture(name);
        let prepared = LanguageModel::load(&dir, device_spec(), DType::F32).expect("load");
        let plain =
            LanguageModel::load_backbone(&dir, device_spec(), DType::F32).expect("backbone");
        let got: std::collections::BTreeMap<String, Tensor> =
            prepared.model.named_params().into_iter().collect();
        let want = plain.model.named_params();
        for (key, w) in &want {
            let g = got
                .get(key)
                .unwrap_or_else(|| panic!("{name}: {key} missing"));
            assert_eq!(g.size(), w.size(), "{name}: {key}");
            assert!(g.equal(w), "{name}: {key} differs");
        }
        let extra: Vec<&String> = got
            .keys()
            .filter(|k| !want.iter().any(|(w, _)| w == *k) && k.as_str() != "lm_head.weight")
            .collect();
        assert!(extra.is_empty(), "{name}: {extra:?}");
        if name == "llama-mha" {
            // q/k/v joined: the names are views of one tensor, k's rows following q's; on the
            // CPU that tensor is stored [in, out], so the views are transposed.
            let q = &got["model.layers.0.self_attn.q_proj.weight"];
            let k = &got["model.layers.0.self_attn.k_proj.weight"];
            let offset = k.data_ptr() as usize - q.data_ptr() as usize;
            if device() == tch::Device::Cpu {
                assert!(!q.is_contiguous());
                assert_eq!(offset, q.size()[0] as usize * 4);
            } else {
                assert_eq!(offset, q.numel() * 4);
            }
        }
    }
}
