"""Teacher once, students many: a content-addressed cache of the teacher's top-k next-token log-probs.

Most of a distillation step is the teacher's forward pass, and a study trains many students on one
teacher (arms, seeds, ranks, learning rates). ``llm-neo cache-teacher`` runs the teacher once over the
data and stores what a student's KD term needs; ``llm-neo distill --teacher-cache CACHE`` then trains
without loading the teacher at all.

What is stored, for every trained position of every example (the positions ``distill`` trains: the
shifted next-token targets of the response, or of everything with ``--train-on-prompt``):

    ids        [P, k] int32   the teacher's k most probable tokens, most probable first
    log_probs  [P, k] fp16    their log-probabilities at the cache's temperature T (computed in fp32:
                              ``log_softmax(logits[:, :V] / T)``, V = the tokenizer length)
    tail       [P]    fp16    log of the mass outside the top-k (a logsumexp of the other columns;
                              -inf when k == V)
    offsets    [n+1]  int64   example i of the shard owns rows offsets[i]:offsets[i+1]

in shards of ``--shard-size`` examples (``shard-00000.safetensors``, ...), in the order of the tokenized
examples, which is the order ``distill`` builds them in (its held-out split keeps that order, so each
example maps to its cache row by its index). About k·(4 + 2) + 2 bytes per trained token: 386 at
k = 64. ``--logprob-dtype float32`` doubles the log-prob bytes for exact values.

Content addressing. ``manifest.json`` records a key, one entry per input that changes the stored
numbers or their alignment with the examples:

    teacher_weights   sha256 of the teacher's weight files (streamed: ~1-2 GB/s, 10-20 s for 16 GB)
    teacher_config    sha256 of its config.json (canonical JSON, without transformers_version)
    tokenizer         sha256 of the tokenizer (vocabulary, merges, normalisation, special tokens)
    chat_template     sha256 of the chat template (none: the hash of an empty string)
    data              sha256 of the data file's bytes (every file, for a datasets directory)
    max_length, train_on_prompt, temperature    the values
    tokens            sha256 of the tokenized examples (input ids and trained positions): catches
                      anything else that changes them, such as another llm-neo rendering of records
    student_weights   with --student-samples: sha256 of the sampling student's weight files
    sampling          with --student-samples: --samples-per-prompt and the --sample-* options as given

With ``--student-samples S`` the cache holds the teacher's targets on S's own responses to the data's
prompts (n per prompt; row r is sample r mod n of data example r // n), and each shard also holds the
samples' tokens (``input_ids``, ``input_offsets``, ``response_starts``): ``distill --on-policy 1`` trains on
those, on-policy to the initial student S (docs/on-policy.md).

With ``--cross-tokenizer METHOD`` (and the student as ``--tokenizer``) the teacher reads its own tokens and
each row holds the aligned target the online cross-tokenizer path computes at that student position; a
shard adds ``kd_rows [P] bool`` (the rows that have one) and the key the method and the teacher's
tokenizer and chat template (docs/teacher-cache.md).

``distill --teacher-cache`` recomputes every part it can (the teacher's only when ``--teacher`` is
also given) and refuses a cache that differs, naming each part that differs and how to fix it.

Writing is atomic and resumable: the key goes to ``key.json`` first, each shard is written under a
temporary name and renamed, and ``manifest.json`` comes last. Running the same command again after a
kill skips the complete shards (checked against the key) and computes the rest; the result is
byte-identical to an uninterrupted run.

Under torchrun the ranks split the missing shards (the i-th to rank i mod world size), with the teacher
replicated or FSDP2-sharded (``--teacher-shard``); rank 0 verifies them all and writes the manifest. The
layout depends on ``--shard-size`` only, so any number of ranks writes (and resumes) the same cache.
"""
