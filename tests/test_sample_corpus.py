"""The offline stand-in corpus: pinned bytes, enwik8's format, and learnable structure."""

import hashlib
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from rwkv_lib.data import ByteVocab, unigram_entropy_bits
from rwkv_lib.sample_corpus import (
    SAMPLE_SHA256,
    SAMPLE_SIZE,
    SplitMix64,
    generate_sample_corpus,
)

NS = "{http://www.mediawiki.org/xml/export-0.3/}"


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return generate_sample_corpus()


def _complete_pages(data: bytes) -> str:
    """The dump up to its last complete page, closed so that it is a whole XML document."""
    end = data.rfind(b"</page>") + len(b"</page>")
    return data[:end].decode("utf-8") + "\n</mediawiki>\n"


def test_splitmix64_matches_the_reference_sequence():
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_default_output_is_pinned(corpus):
    assert len(corpus) == SAMPLE_SIZE >= 1_000_000
    assert hashlib.sha256(corpus).hexdigest() == SAMPLE_SHA256


def test_generation_is_deterministic_and_fast():
    start = time.perf_counter()
    again = generate_sample_corpus()
    assert time.perf_counter() - start < 3.0
    assert again == generate_sample_corpus()
    assert generate_sample_corpus(20_000, seed=9) != generate_sample_corpus(20_000, seed=8)


@pytest.mark.parametrize("n_bytes", [1, 1000, 54_321])
def test_exact_length_and_cut_like_enwik8(corpus, n_bytes):
    # A shorter corpus is a prefix of a longer one: the dump is simply cut.
    data = generate_sample_corpus(n_bytes)
    assert len(data) == n_bytes
    assert corpus.startswith(data)


def test_rejects_non_positive_size():
    with pytest.raises(ValueError, match="positive"):
        generate_sample_corpus(0)


def test_dump_header_and_page_records(corpus):
    assert corpus.startswith(b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/"')
    assert b"<siteinfo>" in corpus[:3000] and b"</siteinfo>" in corpus[:3000]
    assert corpus.count(b"<page>") >= 500
    for tag in (b"<title>", b"<id>", b"<revision>", b"<timestamp>", b"<contributor>",
                b"<username>", b"<ip>", b"<comment>", b'<text xml:space="preserve">'):
        assert tag in corpus, tag


def test_wiki_markup_is_present(corpus):
    text = _complete_pages(corpus)
    for needle in ("\n== ", " ==\n", "\n=== ", "'''", "\n* ", "{| class=", "\n|}", "{{Infobox",
                   "{{cite book", "[[Category:", "#REDIRECT [[", "&lt;ref&gt;", "&gt;",
                   "&amp;", "&quot;", "&amp;nbsp;"):
        assert needle in text, needle
    assert re.search(r"\[\[[^\]|]+\]\]", text), "plain link"
    assert re.search(r"\[\[[^\]|]+\|[^\]|]+\]\]", text), "piped link"
    assert re.search(r"(?<!')''[^'\n]+''(?!')", text), "italic"


def test_multibyte_utf8(corpus):
    text = _complete_pages(corpus)  # raises if any complete page is invalid UTF-8
    for name, pattern in [("accented Latin", "[\u00c0-\u017f]"), ("Greek", "[\u0370-\u03ff]"),
                          ("Cyrillic", "[\u0400-\u04ff]"), ("CJK", "[\u4e00-\u9fff]")]:
        assert re.search(pattern, text), name
    # Only the cut at the very end may split a character.
    tail = corpus[-4:]
    assert any(_decodes(corpus[: len(corpus) - k]) for k in range(4)), tail


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_parses_as_xml(corpus):
    root = ET.fromstring(_complete_pages(corpus))
    pages = root.findall(f"{NS}page")
    assert len(pages) == corpus.count(b"</page>")
    ids = [int(page.findtext(f"{NS}id")) for page in pages]
    assert ids == list(range(1, len(pages) + 1))
    titles = [page.findtext(f"{NS}title") for page in pages]
    assert len(set(titles)) == len(titles), "titles are unique"
    texts = [page.find(f"{NS}revision/{NS}text").text for page in pages]
    assert all(texts)
    assert any("<ref>" in t for t in texts), "escapes decode back to wiki markup"


def test_byte_statistics_are_enwik8_like(corpus):
    assert 60 <= ByteVocab.from_data(corpus).size <= 256
    assert 4.0 <= unigram_entropy_bits(corpus) <= 5.5


def test_words_follow_a_skewed_distribution(corpus):
    # A small vocabulary of frequent words is what makes the corpus learnable.
    words = Counter(re.findall(r"[a-z]+", _complete_pages(corpus)))
    total = sum(words.values())
    top50 = sum(count for _, count in words.most_common(50))
    assert len(words) < 3000
    assert top50 / total > 0.4
