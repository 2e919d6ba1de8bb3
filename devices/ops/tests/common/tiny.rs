//! A tiny synthetic sentence-transformers BERT (vocab 10, H 4, 1 layer, 2 heads, FFN 8) with
//! a WordPiece tokenizer: its `config.json`, `tokenizer.json` and directory layout. Each test
//! brings its own checkpoint bytes.

use std::path::Path;

/// The tiny model's `config.json`.
pub const CONFIG: &str = r#"{"architectures":["BertModel"],"hidden_act":"gelu","hidden_size":4,
"intermediate_size":8,"layer_norm_eps":1e-12,"max_position_embeddings":8,"model_type":"bert",
"num_attention_heads":2,"num_hidden_layers":1,"pad_token_id":0,"position_embedding_type":"absolute",
"type_vocab_size":2,"vocab_size":10}"#;

/// The tiny model's `tokenizer.json` (WordPiece over 10 tokens).
pub const TOKENIZER: &str = r###"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[
 {"id":0,"content":"[PAD]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
 {"id":1,"content":"[UNK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
 {"id":2,"content":"[CLS]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
 {"id":3,"content":"[SEP]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true},
"pre_tokenizer":{"type":"BertPreTokenizer"},
"post_processor":{"type":"TemplateProcessing",
 "single":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}}],
 "pair":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}},{"Sequence":{"id":"B","type_id":1}},{"SpecialToken":{"id":"[SEP]","type_id":1}}],
 "special_tokens":{"[CLS]":{"id":"[CLS]","ids":[2],"tokens":["[CLS]"]},"[SEP]":{"id":"[SEP]","ids":[3],"tokens":["[SEP]"]}}},
"decoder":null,
"model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,
 "vocab":{"[PAD]":0,"[UNK]":1,"[CLS]":2,"[SEP]":3,"hello":4,"world":5,"private":6,"cloud":7,"##s":8,".":9}}}"###;

/// (name, shape) of every tensor of the tiny BERT, with the unused `pooler.dense.weight`
/// (index 5) when `pooler`.
pub fn layout(pooler: bool) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("embeddings.word_embeddings.weight".into(), vec![10, 4]),
        ("embeddings.position_embeddings.weight".into(), vec![8, 4]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, 4]),
        ("embeddings.LayerNorm.weight".into(), vec![4]),
        ("embeddings.LayerNorm.bias".into(), vec![4]),
    ];
    if pooler {
        t.push(("pooler.dense.weight".into(), vec![4, 4]));
    }
    let p = "encoder.layer.0";
    for (name, out, inp) in [
        ("attention.self.query", 4, 4),
        ("attention.self.key", 4, 4),
        ("attention.self.value", 4, 4),
        ("attention.output.dense", 4, 4),
        ("intermediate.dense", 8, 4),
        ("output.dense", 4, 8),
    ] {
        t.push((format!("{p}.{name}.weight"), vec![out, inp]));
        t.push((format!("{p}.{name}.bias"), vec![out]));
    }
    for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
        t.push((format!("{p}.{ln}.weight"), vec![4]));
        t.push((format!("{p}.{ln}.bias"), vec![4]));
    }
    t
}

/// Writes the tiny sentence-transformers directory at `p` (created if needed) with
/// `checkpoint` as its `model.safetensors`.
pub fn write_model_dir(p: &Path, checkpoint: &[u8]) {
    std::fs::create_dir_all(p.join("1_Pooling")).unwrap();
    std::fs::write(p.join("config.json"), CONFIG).unwrap();
    std::fs::write(
        p.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 8}"#,
    )
    .unwrap();
    std::fs::write(
        p.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 4, "pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();
    std::fs::write(
        p.join("modules.json"),
        r#"[{"type":"sentence_transformers.models.Transformer"},{"type":"sentence_transformers.models.Pooling"},{"type":"sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    std::fs::write(p.join("tokenizer.json"), TOKENIZER).unwrap();
    std::fs::write(p.join("model.safetensors"), checkpoint).unwrap();
}
