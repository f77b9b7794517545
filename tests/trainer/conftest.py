import pytest

BPE_VOCAB = 400  # 256 byte symbols, the two special tokens, and merges


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One embedded-corpus build shared by every trainer test."""
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A directory holding a byte-level BPE tokenizer of ``BPE_VOCAB`` tokens trained on 20 files of the
    embedded corpus (about a second), loadable with ``AutoTokenizer.from_pretrained``: BOS ``<s>`` (id 0)
    before each text, EOS ``</s>`` (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from mecefo.data import stdlib_sources

    texts = [path.read_text() for path in stdlib_sources()[:20]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("bpe-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path
