"""LLaVA-Med v1.5 (the LLaVA repository's own `llava_mistral` checkpoint) -> a transformers
`LlavaForConditionalGeneration` directory, and the logit-match check that proves the conversion exact.

    launcher model convert-llava-med --src models/llava-med-v1.5-mistral-7b \\
        --vision-tower models/clip-vit-large-patch14-336 --out models/llava-med-v1.5-mistral-7b-hf --verify

What changes, and nothing else does (the names are the module names of transformers 5.24's LLaVA, so the output loads
with no key renaming; `convert()` checks every name and shape against a meta-device instance of that class):

    original (llava_mistral + the CLIP tower dir)        converted
    model.embed_tokens / model.layers.N.* / model.norm  model.language_model.embed_tokens / .layers.N.* / .norm
    lm_head.weight                                      lm_head.weight
    model.mm_projector.0.* / model.mm_projector.2.*     model.multi_modal_projector.linear_1.* / .linear_2.*
    CLIP dir: vision_model.* (CLIPModel) or unprefixed  model.vision_tower.*   (text tower, projections: dropped)

plus an `<image>` and a `<pad>` token: embed_tokens and lm_head gain rows initialised to the mean of the existing rows
(what LLaVA's own `initialize_vision_tokenizer` does for added tokens). The image token's embedding row is never used by
the model (those positions are overwritten by projected image features); it only has to exist.

Memory: tensors are streamed one at a time. The safetensors reader uses plain seek+read (no mmap, so the page cache is
not charged to this process) and the writer writes the header first, then each tensor's bytes, so peak memory is about
the largest single tensor (embed_tokens: 32000 x 4096 bf16 = 262 MB for the 7B), not a shard and never the model.
Each input shard becomes one output shard; the vision tower gets its own.

The output is written to `OUT.partial` and renamed to OUT only after it validated (and, with --verify, matched the

The modules, in the order a conversion runs (the CLI is launcher/commands/model.py):

    source.py              reading the original: its config and the CLIP tower's (SourceInfo), its weight files
                           (safetensors or, with --allow-pickle, .bin) and its tokenizer
    safetensors_stream.py  the safetensors format one tensor at a time: the seek+read reader, the header-first writer
    plan.py                every output tensor's name, shape and source, checked against transformers' LLaVA, and
                           the LlavaConfig, before a byte of weights is read
    writing.py             the planned tensors streamed into output shards (new rows = the mean row)
    processor.py           tokens added, the mistral_instruct chat template, the image processor, the LlavaProcessor
    convert.py             convert(): all of the above into OUT.partial, --verify, then the rename to OUT
    verify.py              the original LLaVA forward rebuilt by hand, and the logit comparison with the converted model
"""
