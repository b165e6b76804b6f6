"""An offline stand-in for enwik8: a made-up wiki, written in the same XML dump format.

Notebook 01_data uses it whenever enwik8 has not been downloaded, and the tests and the CI
profile use it always. `rwkv_lib.data.resolve_corpus("sample")` writes it to
`data/sample_corpus.txt` on first use.

What it imitates: enwik8 is the first 10^8 bytes of a MediaWiki XML dump. So this file starts
with a `<mediawiki>` header and `<siteinfo>`, then holds `<page>` records (title, id,
revision, contributor, timestamp) whose `<text>` is XML-escaped wiki markup: headings,
links, bold and italic, lists, tables, templates, `<ref>` tags, categories, and some
non-ASCII UTF-8 (accented and Nordic names, a few Greek, Russian and CJK words). Like
enwik8 it is simply cut at the requested length, wherever that falls.

The articles describe an invented world (countries, towns, rivers, people, species) and
are built from word lists and sentence templates by a small grammar. Words are drawn with
Zipf-like frequencies and every article type has a fixed layout, so there is real
structure for a small model to learn in minutes on a CPU.

Determinism: the output must be byte-identical on every platform and Python version, so
the generator uses its own integer PRNG (SplitMix64), integer-only arithmetic, and ordered
containers; never `random`, numpy's RNG, `hash()`, set order or float formatting.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = [
    "SAMPLE_SEED",
    "SAMPLE_SHA256",
    "SAMPLE_SIZE",
    "SplitMix64",
    "generate_sample_corpus",
]

SAMPLE_SIZE = 1_200_000
SAMPLE_SEED = 8
# sha256 of generate_sample_corpus() with the defaults; tests/test_sample_corpus.py pins it.
SAMPLE_SHA256 = "a62bd0e629f4a62675f73939b42c92228f6f10b25bc5b8bead53a01c8b2a509d"

MASK64 = (1 << 64) - 1
T = TypeVar("T")


class SplitMix64:
    """A tiny 64-bit PRNG (SplitMix64) written with Python integers masked to 64 bits."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """An integer in [0, n). The modulo bias (< n / 2^64) is far too small to matter."""
        return self.next_u64() % n

    def between(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi], both ends included."""
        return lo + self.below(hi - lo + 1)

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def zipf(self, items: Sequence[T]) -> T:
        """Pick item k with weight 1/(k+1): early entries are common, late ones rare."""
        return items[self.zipf_index(len(items))]

    def zipf_index(self, n: int) -> int:
        cumulative = _zipf_table(n)
        return bisect.bisect_right(cumulative, self.below(cumulative[-1]))


_ZIPF_TABLES: dict[int, list[int]] = {}


def _zipf_table(n: int) -> list[int]:
    # Integer weights (2^20 // (k+1)) keep the draw free of floating point.
    if n not in _ZIPF_TABLES:
        total, table = 0, []
        for k in range(n):
            total += (1 << 20) // (k + 1)
            table.append(total)
        _ZIPF_TABLES[n] = table
    return _ZIPF_TABLES[n]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _phrases(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(";") if p.strip())


def _templates(text: str) -> tuple[str, ...]:
    # One template per line (a ";" would clash with entities such as "&nbsp;").
    return tuple(line.strip() for line in text.splitlines() if line.strip())


# --- The invented world -------------------------------------------------------------------
# (name, demonym, naming style). Each style has its own syllables, so names "sound" local.
COUNTRIES = (
    ("Valdoria", "Valdorian", "plain"),
    ("Orlenne", "Orlennais", "french"),
    ("Ålmark", "Ålmarkish", "nordic"),
    ("Tervany", "Tervanian", "plain"),
)
TOWN_SYLLABLES = {
    "plain": (
        _words("Ash Bel Bram Cal Cor Dun El Fen Gar Hal Hart Kin Lor Mar Mel Nor Oak Pen Ros"
               " Sel Stan Thorn Wes Wynd"),
        ("", "", "", "ing", "er", "en", "on"),
        _words("ford ham wick by stead mouth bridge ton dale holm field minster port thorpe"
               " well combe"),
    ),
    "french": (
        _words("Bré Châ Mé Lé Vi Sau Mont Roche Beau Val Fon Cler Aur Gé Mar Cha"),
        ("", "", "a", "e", "i"),
        _words("val lac ville mont gny court ac seille rieux nay zac mère"),
    ),
    "nordic": (
        _words("Ås Øster Nord Sjö Berg Lund Fjäll Hög Väst Strö Kvarn Björk Ek Gran"),
        ("", "", "s", "a", "e"),
        _words("vik by holm sund dal ås fors hamn torp stad näs"),
    ),
}
REGION_SYLLABLES = (
    _words("Kess Thur Sall Brenn Ast Mor Gel Hav Dray Orm Quen Lyth"),
    _words("mark vald mere lund land moor wold dal reach fell"),
)
RIVER_SYLLABLES = (
    _words("Ar Tes Wen Lod Cam Ous Kel Mir Sev Dor Yar Lun Ebb Ros"),
    _words("sel wy en er ay ine an ow ith"),
)
FIRST_NAMES = {  # style -> (male names, female names)
    "plain": (
        _words("John William Thomas George Henry Edward Robert Arthur Walter Frederick"
               " Albert Samuel Charles"),
        _words("Mary Elizabeth Anne Margaret Alice Jane Emily Grace Harriet Clara Edith Ruth"),
    ),
    "french": (
        _words("François René Joël Léon Jérôme Gaël Étienne Benoît Frédéric Raphaël"),
        _words("Hélène Amélie Cécile Zoé Noémie Thérèse Aurélie Agnès Mélanie"),
    ),
    "nordic": (
        _words("Søren Björn Jörgen Håkan Øystein Lars Torbjörn Mårten Nils"),
        _words("Åsa Märta Ingrid Sigrid Gunnhild Astrid Kjersti Solveig Britt"),
    ),
}
SURNAMES = {
    "plain": _words("Ashworth Bramley Carter Dunmore Ellison Fairbanks Goodwin Hartley Ingram"
                    " Kingsley Lowell Marsh Norwood Osborne Prescott Radcliffe Thornton"
                    " Underwood Whitmore"),
    "french": _words("Dubois Lefèvre Moreau Bérard Côté Giraud Rénier Chassagne Dufresne"
                     " Lacroix Ferrand Hébert Marchal Séverin Vaillant"),
    "nordic": _words("Lindqvist Håkansson Bergström Sjöberg Ødegaard Nyström Åberg Dahl"
                     " Ekström Holmgren Kjær Løvland Sundqvist Wallin"),
}
# Foreign words for etymology sentences: (language, word, meaning).
FOREIGN = (
    ("Greek", "ποταμός", "river"),
    ("Greek", "λίμνη", "lake"),
    ("Greek", "ὄρος", "mountain"),
    ("Russian", "река", "river"),
    ("Russian", "город", "town"),
    ("Russian", "лес", "forest"),
    ("Japanese", "川", "river"),
    ("Chinese", "山", "mountain"),
    ("Chinese", "城", "walled town"),
    ("Japanese", "森", "forest"),
)
PROFESSIONS = _words("composer painter mathematician botanist politician architect poet"
                     " engineer astronomer historian sculptor physician")
SUBJECTS = _words("mathematics music law medicine botany history architecture painting"
                  " engineering astronomy theology")
# (kind, link target, family suffix, common-name nouns)
SPECIES_KINDS = (
    ("bird", "bird", "idae", _words("warbler finch heron lark plover")),
    ("beetle", "beetle", "idae", _words("beetle weevil")),
    ("frog", "frog", "idae", _words("frog toad")),
    ("fern", "fern", "aceae", _words("fern spleenwort")),
    ("orchid", "orchid", "aceae", _words("orchid")),
    ("moth", "moth", "idae", _words("moth")),
    ("fish", "fish", "idae", _words("minnow loach")),
)
SPECIES_ADJECTIVES = _words("Grey Crested Spotted Lesser Greater Marsh Mountain Common Dusky"
                            " Pale Banded Northern Golden Hooded")
GENUS_SYLLABLES = (
    _words("Pal Mer Cor Stri Ten Lac Ver Ort Dal Fen Quil"),
    _words("ana ella ix opsis ura odon ia"),
)
EPITHETS = _words("minor major borealis vulgaris alpina fusca rubra montana aquatica"
                  " palustris")

# --- Vocabulary for the sentence grammar, most common first (drawn Zipf-like) ------------
ADJECTIVES = _words("old small large new important early local main northern southern"
                    " famous ancient narrow wide central historic quiet busy rural modern"
                    " eastern western wooden medieval")
NOUNS = _words("church market bridge school mill castle harbour station square library"
               " abbey museum farm theatre hall tower brewery chapel canal quarry")
PLURALS = _words("churches markets bridges schools mills castles harbours stations squares"
                 " libraries abbeys museums farms theatres halls towers breweries chapels"
                 " canals quarries")
BUILT = _words("built founded rebuilt restored enlarged opened destroyed replaced closed"
               " extended")
INDUSTRIES = _phrases("agriculture; fishing; textiles; tourism; wool trade; shipbuilding;"
                      " brewing; timber; coal mining; glassmaking; printing; pottery")
EVENTS = _phrases("a great fire; a flood; the plague; a long war; a railway boom;"
                  " a famine; a royal visit; an earthquake")
ORDINALS = _words("first second third fourth fifth sixth")
TRADES = _words("farmer miller weaver teacher merchant carpenter clergyman sailor")
WORKS = _phrases("Symphony in D; The River Suite; Songs of the Valley; Three Studies;"
                 " On the Motion of Water; A Winter Journey; The Harbour at Dawn;"
                 " Notes on Ferns; The Old Mill")
COMMENTS = _phrases("fixed typo; expand history section; /* History */ tidy; added"
                    " infobox; rv vandalism; copyedit; added references; stub;"
                    " moved categories; /* Geography */ more detail")
USERNAMES = _words("Mapwright Quillon Riverrun Oldstones Fernfinder Tallyho Bluepencil"
                   " Wanderer77 Harbourlight Cartographer Dustjacket Longbow")

HISTORY = _templates("""
{Title} was first recorded in {year} as a {adj} settlement on the {river}.
The {adj} {noun} was {built} in {year} and still stands near the {noun2}.
In {year} the town suffered {event}, and much of the {adj} {noun} was lost.
By {year} {title} had become the main centre of {industry} in {region}.
The {noun} was {built} in {year} after {event}.
During the {century} century the town grew around its {noun} and {noun2}.
A charter of {year} granted {title} the right to hold a weekly market.
Local tradition calls the {noun} "the {adj} {noun2}".
The family of {person} owned the {noun} until {year}.
In {year} the {railway} reached the town.""")
GEOGRAPHY = _templates("""
{Title} lies on the {river}, about {km}&nbsp;km from {town}.
The town stands at an elevation of {elev}&nbsp;m above sea level.
The {adj} hills to the north separate {title} from {town}.
Much of the surrounding land is used for {industry}.
The {river} is crossed here by a {adj} bridge of {num} arches.""")
RIVER_COURSE = _templates("""
The {title} rises in the {adj} hills of {region} and flows {direction} past {town}.
Below {town} the valley widens and the river can be used by small boats.
The river drove the mills at {town} until {year}.
Its water is highest in {month}, after the snow melts in {region}.
A {adj} canal of {year} links the river with the {river}.
The {title} is crossed by {num} bridges, the oldest of them at {town}.""")
ECONOMY = _templates("""
The economy of {title} was long based on {industry} and {industry2}.
Today the largest employers are in {industry} and the {adj} {noun} trade.
The {adj} market is held every {weekday}.
A {noun} on the edge of town employs about {num}0 people.""")
CULTURE = _templates("""
The {adj} {noun} houses a collection of local {plural}.
Every summer the town holds a festival of music and {industry}.
The {noun} is one of the {superlative} {plural} in {region}.
{Person} described the town as "{adj} and {adj2}".""")
EARLY_LIFE = _templates("""
{First} was born in {town} in {born}, the {ordinal} child of a {trade}.
{He} studied {subject} at the University of {town_plain}.
As a young {profession}, {first} travelled through {region} and {region2}.
{His} early teachers included {person}.""")
CAREER = _templates("""
In {year} {first} moved to {town}, where {he} worked for the rest of {his} life.
{His} best known work, ''{work}'', appeared in {year}.
{He} was elected to the Academy of {country} in {year}.
{First} wrote that {his} aim was "to make the {adj} things {adj2}".
{His} later work was influenced by {person}.
Critics have called ''{work}'' one of the {superlative} works of {his} time.""")
SPECIES_TEXT = _templates("""
The {common_lc} is found in {region}, {region2} and parts of {country}.
It lives in {habitat} and is most often seen in {month}.
Adults reach a length of {num}&nbsp;mm.
The species was first described by {person} in {year}.
It is {status} in {country}, where it is protected by law.
Its numbers have fallen since {year} because of drainage and {industry}.""")
HABITATS = _phrases("wet meadows; old woodland; river banks; reed beds; high moorland;"
                    " chalk grassland; coastal dunes")
STATUSES = _phrases("common; rare; locally common; very rare; declining")
DIRECTIONS = _words("south east north west")
MONTHS = _words("May June July April August September")
WEEKDAYS = _words("Saturday Wednesday Friday Tuesday")
SUPERLATIVES = _words("oldest finest largest best-known smallest")
CENTURIES = _words("12th 13th 15th 16th 17th 18th 19th")


class _World:
    """Names of the invented world, generated on demand and never repeated."""

    def __init__(self, rng: SplitMix64) -> None:
        self.rng = rng
        self.used: dict[str, None] = {}  # an ordered "set": membership only
        self.regions = [
            [self._unique(self._region_name) for _ in range(3)] for _ in COUNTRIES
        ]
        self.towns: list[tuple[str, int]] = []  # (name, country index)
        self.rivers: list[str] = []
        self.people: list[tuple[str, str, bool, int]] = []  # (first, last, female, country)

    def _unique(self, make: Callable[..., str], *args: object) -> str:
        for attempt in range(40):
            name = make(*args)
            if attempt >= 20:  # the syllables ran out: number the name instead
                name = f"{name} {len(self.used)}"
            if name not in self.used:
                self.used[name] = None
                return name
        raise RuntimeError("name generator is stuck")  # unreachable in practice

    def _join(self, *parts: Sequence[str]) -> str:
        return "".join(self.rng.pick(part) for part in parts)

    def _region_name(self) -> str:
        return self._join(*REGION_SYLLABLES)

    def town(self, k: int) -> tuple[str, int]:
        while len(self.towns) <= k:
            country = self.rng.below(len(COUNTRIES))
            syllables = TOWN_SYLLABLES[COUNTRIES[country][2]]
            self.towns.append((self._unique(self._join, *syllables), country))
        return self.towns[k]

    def river(self, k: int) -> str:
        while len(self.rivers) <= k:
            self.rivers.append(self._unique(self._join, ("River ",), *RIVER_SYLLABLES))
        return self.rivers[k]

    def person(self, k: int) -> tuple[str, str, bool, int]:
        while len(self.people) <= k:
            country = self.rng.below(len(COUNTRIES))
            style = COUNTRIES[country][2]
            female = self.rng.chance(45)
            full = self._unique(self._full_name, style, female)
            first, _, last = full.partition(" ")
            self.people.append((first, last, female, country))
        return self.people[k]

    def species_name(self, nouns: Sequence[str]) -> str:
        return self._unique(lambda: self.rng.zipf(SPECIES_ADJECTIVES) + " " + self.rng.zipf(nouns))

    def _full_name(self, style: str, female: bool) -> str:
        return self.rng.zipf(FIRST_NAMES[style][female]) + " " + self.rng.zipf(SURNAMES[style])


class _Writer:
    """Writes the wikitext of one article, filling template slots from the world."""

    def __init__(self, rng: SplitMix64, world: _World) -> None:
        self.rng = rng
        self.world = world
        self.slots: dict[str, str] = {}  # per-article values: title, pronouns, ...
        self.makers = self._makers()  # slot name -> a fresh random value
        self.years = (1150, 1990)  # the span that "{year}" draws from, set per article

    # Links pick popular targets far more often than obscure ones, as a real wiki does.
    def town_link(self) -> str:
        return f"[[{self.world.town(self.rng.zipf_index(120))[0]}]]"

    def river_link(self) -> str:
        name = self.world.river(self.rng.zipf_index(40))
        if self.rng.chance(40):
            return f"[[{name}|{name[6:]}]]"
        return f"[[{name}]]"

    def person_link(self) -> str:
        first, last, _, _ = self.world.person(self.rng.zipf_index(150))
        return f"[[{first} {last}]]"

    def region_link(self) -> str:
        return f"[[{self.rng.pick(self.rng.pick(self.world.regions))}]]"

    def year(self) -> str:
        return str(self.rng.between(*self.years))

    def fill(self, template: str) -> str:
        text = re.sub(r"\{(\w+)\}", self._slot, template)
        return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a old" -> "an old"

    def _slot(self, match: re.Match[str]) -> str:
        key = match.group(1)
        if key in self.slots:
            return self.slots[key]
        lower = key.lower()
        if lower != key and lower in self.slots:  # "{He}" is "{he}" at a sentence start
            value = self.slots[lower]
            return value[:1].upper() + value[1:]
        return self.makers[lower]()

    def _makers(self) -> dict[str, Callable[[], str]]:
        rng, world = self.rng, self.world
        return {
            "year": self.year,
            "adj": lambda: rng.zipf(ADJECTIVES),
            "adj2": lambda: rng.zipf(ADJECTIVES),
            "noun": lambda: rng.zipf(NOUNS),
            "noun2": lambda: rng.zipf(NOUNS),
            "plural": lambda: rng.zipf(PLURALS),
            "built": lambda: rng.zipf(BUILT),
            "industry": lambda: rng.zipf(INDUSTRIES),
            "industry2": lambda: rng.zipf(INDUSTRIES),
            "event": lambda: rng.zipf(EVENTS),
            "town": self.town_link,
            "river": self.river_link,
            "person": self.person_link,
            "region": self.region_link,
            "region2": self.region_link,
            "century": lambda: rng.pick(CENTURIES),
            "railway": lambda: f"{world.town(rng.zipf_index(60))[0]} & "
            f"{world.town(rng.zipf_index(60))[0]} Railway",
            "km": lambda: str(rng.between(3, 60)),
            "elev": lambda: str(rng.between(2, 900)),
            "num": lambda: str(rng.between(2, 40)),
            "weekday": lambda: rng.zipf(WEEKDAYS),
            "superlative": lambda: rng.zipf(SUPERLATIVES),
            "ordinal": lambda: rng.zipf(ORDINALS),
            "trade": lambda: rng.zipf(TRADES),
            "subject": lambda: rng.zipf(SUBJECTS),
            "profession": lambda: rng.zipf(PROFESSIONS),
            "work": lambda: rng.zipf(WORKS),
            "habitat": lambda: rng.zipf(HABITATS),
            "status": lambda: rng.zipf(STATUSES),
            "month": lambda: rng.zipf(MONTHS),
            "direction": lambda: rng.zipf(DIRECTIONS),
            "town_plain": lambda: world.town(rng.zipf_index(30))[0],
        }

    def paragraph(self, templates: Sequence[str], lo: int, hi: int) -> str:
        chosen: list[int] = []
        for _ in range(min(self.rng.between(lo, hi), len(templates))):
            k = self.rng.zipf_index(len(templates))
            while k in chosen:  # no sentence pattern twice in one paragraph
                k = (k + 1) % len(templates)
            chosen.append(k)
        sentences = [self.fill(templates[k]) for k in chosen]
        if self.rng.chance(35):  # cite the paragraph, as enwik8's articles often do
            sentences[-1] += self.reference()
        return " ".join(sentences)

    def reference(self) -> str:
        first, last, _, _ = self.world.person(self.rng.zipf_index(150))
        region = self.rng.pick(self.rng.pick(self.world.regions))
        return (
            f"<ref>{{{{cite book | last = {last} | first = {first} | title = A History of"
            f" {region} | year = {self.rng.between(1880, 2004)} | pages = "
            f"{self.rng.between(3, 400)}}}}}</ref>"
        )

    def etymology(self, name: str) -> str:
        language, word, meaning = self.rng.zipf(FOREIGN)
        return (
            f"The name {name} is said to come from an old word for \"{meaning}\"; compare"
            f" {language} ''{word}''."
        )

    def bullets(self, items: Sequence[str]) -> str:
        return "\n".join(f"* {item}" for item in items)


def _lifespan(rng: SplitMix64) -> tuple[int, int, str]:
    """Birth year, last active year, and the dates as an article writes them."""
    born = rng.between(1700, 1950)
    died = born + rng.between(30, 90)
    if died >= 2005:  # still living when the dump was made
        return born, 2005, f"born {born}"
    return born, died, f"{born}–{died}"  # en dash: 3 UTF-8 bytes


def _town_article(w: _Writer, k: int) -> tuple[str, str, str | None]:
    rng, world = w.rng, w.world
    name, country = world.town(k)
    country_name, demonym, _ = COUNTRIES[country]
    region = rng.pick(world.regions[country])
    w.slots = {"title": name, "region": f"[[{region}]]"}
    w.years = (1150, 1990)
    population = rng.between(800, 90000)
    lines = [
        "{{Infobox Town",
        f"| name = {name}",
        f"| region = [[{region}]]",
        f"| country = [[{country_name}]]",
        f"| population = {population}",
        f"| founded = {w.year()}",
        "}}",
        f"'''{name}''' is a {rng.zipf(_words('market small port cathedral mill'))} town in"
        f" the [[{region}]] region of [[{country_name}]], on the {w.river_link()}. It had a"
        f" population of {population:,} in {rng.between(1991, 2005)}.",
        "",
        "== History ==",
        w.paragraph(HISTORY, 2, 5),
    ]
    if rng.chance(50):
        lines += ["", "=== Name ===", w.etymology(f"''{name}''")]
    lines += ["", "== Geography ==", w.paragraph(GEOGRAPHY, 1, 3)]
    if rng.chance(60):
        year, step = rng.between(1801, 1851), rng.pick((10, 20, 25, 50))
        people = rng.between(300, 9000)
        rows = []
        while year <= 2001:
            rows += ["|-", f"| {year} || {people:,}"]
            year += step
            people = people * rng.between(85, 140) // 100
        lines += ["", "== Population ==", '{| class="wikitable"', "|-",
                  "! Year !! Population", *rows, "|}"]
    lines += ["", "== Economy ==", w.paragraph(ECONOMY, 1, 3)]
    if rng.chance(50):
        lines += ["", "== Culture ==", w.paragraph(CULTURE, 1, 3)]
    if rng.chance(55):
        lines += ["", "== Notable people ==", w.bullets([
            f"{w.person_link()} ({_lifespan(rng)[2]}), {rng.zipf(PROFESSIONS)}"
            for _ in range(rng.between(1, 4))
        ])]
    lines += [
        "", "== See also ==", w.bullets([f"[[List of towns in {region}]]", w.town_link()]),
        "", "== References ==", "<references/>",
        "", "== External links ==",
        f"* [http://www.{name.lower()}.example.org Official website of {name}]",
        "", f"[[Category:Towns in {region}]]", f"[[Category:{demonym} towns]]",
    ]
    return name, "\n".join(lines), f"{name}, {region}"


def _river_article(w: _Writer, k: int) -> tuple[str, str, str | None]:
    rng, world = w.rng, w.world
    name = world.river(k)
    country = rng.below(len(COUNTRIES))
    w.slots = {"title": name, "region": w.region_link()}
    w.years = (1150, 1990)
    length = rng.between(12, 480)
    towns = [w.town_link() for _ in range(rng.between(2, 4))]
    lines = [
        f"The '''{name}''' is a river in [[{COUNTRIES[country][0]}]]. It is {length}&nbsp;km"
        f" long and flows through {', '.join(towns[:-1])} and {towns[-1]} before it joins"
        f" the {w.river_link()}.",
        "",
        "== Course ==",
        w.paragraph(RIVER_COURSE, 2, 4),
        "",
        "== Name ==",
        w.etymology(f"''{name[6:]}''"),
        "",
        "== Tributaries ==",
        '{| class="wikitable"', "|-", "! Tributary !! Length (km)",
    ]
    for _ in range(rng.between(2, 5)):
        lines += ["|-", f"| {w.river_link()} || {rng.between(4, length // 2 + 5)}"]
    lines += ["|}", "", f"[[Category:Rivers of {COUNTRIES[country][0]}]]"]
    return name, "\n".join(lines), f"{name[6:]} River"


def _person_article(w: _Writer, k: int) -> tuple[str, str, str | None]:
    rng, world = w.rng, w.world
    first, last, female, country = world.person(k)
    country_name, demonym, _ = COUNTRIES[country]
    born, died, dates = _lifespan(rng)
    profession = rng.zipf(PROFESSIONS)
    he, his = ("she", "her") if female else ("he", "his")
    w.slots = {"first": first, "he": he, "his": his, "country": country_name,
               "profession": profession, "born": str(born)}
    w.years = (born + 16, died)
    article = "an" if demonym[0] in "AEIOUÅ" else "a"
    lines = [
        f"'''{first} {last}''' ({dates}) was {article} {demonym} {profession}.",
        "",
        "== Early life ==",
        w.paragraph(EARLY_LIFE, 2, 4),
        "",
        "== Career ==",
        w.paragraph(CAREER, 2, 5),
    ]
    if profession in ("composer", "painter", "poet", "sculptor") or rng.chance(40):
        lines += ["", "== Works ==", w.bullets([
            f"''{rng.zipf(WORKS)}'' ({rng.between(born + 18, died)})"
            for _ in range(rng.between(2, 5))
        ])]
    lines += [
        "", "== References ==", "<references/>", "",
        "{{DEFAULTSORT:" + f"{last}, {first}" + "}}",
        f"[[Category:{demonym} {profession}s]]",
        f"[[Category:{born} births]]",
    ]
    if not dates.startswith("born"):
        lines.append(f"[[Category:{died} deaths]]")
    return f"{first} {last}", "\n".join(lines), f"{last}, {first}"


def _species_article(w: _Writer, k: int) -> tuple[str, str, str | None]:
    rng = w.rng
    kind, link, family_suffix, nouns = SPECIES_KINDS[k % len(SPECIES_KINDS)]
    common = w.world.species_name(nouns)
    genus = rng.pick(GENUS_SYLLABLES[0]) + rng.pick(GENUS_SYLLABLES[1])
    binomial = f"{genus} {rng.zipf(EPITHETS)}"
    country = rng.below(len(COUNTRIES))
    w.slots = {"common_lc": common.lower(), "country": COUNTRIES[country][0]}
    w.years = (1758, 2004)
    family = genus[:-1] + family_suffix if genus[-1] in "aeiou" else genus + family_suffix
    lines = [
        "{{Taxobox",
        f"| name = {common}",
        f"| status = {rng.pick(('LC', 'NT', 'VU', 'EN'))}",
        f"| familia = [[{family}]]",
        f"| genus = ''[[{genus}]]''",
        f"| binomial = ''{binomial}''",
        "}}",
        f"The '''{common.lower()}''' (''{binomial}'') is a species of [[{link}]] in the"
        f" family [[{family}]].",
        "",
        "== Description ==",
        w.paragraph(SPECIES_TEXT, 2, 4),
        "",
        "== Distribution ==",
        w.bullets([w.region_link() for _ in range(rng.between(2, 4))]),
        "",
        f"[[Category:{kind.capitalize()}s of {COUNTRIES[country][0]}]]",
    ]
    return common, "\n".join(lines), binomial


def _list_article(w: _Writer, k: int) -> tuple[str, str, str | None]:
    country = k % len(COUNTRIES)
    region = w.world.regions[country][(k // len(COUNTRIES)) % 3]
    towns = list(dict.fromkeys(w.town_link() for _ in range(w.rng.between(8, 20))))
    text = (
        f"This is a list of towns in [[{region}]], a region of [[{COUNTRIES[country][0]}]].\n\n"
        + w.bullets(towns) + f"\n\n[[Category:Lists of towns|{region}]]"
    )
    suffix = f" ({k // 12 + 1})" if k >= 12 else ""
    return f"List of towns in {region}{suffix}", text, None


def _xml_escape(text: str) -> str:
    # What MediaWiki's exporter does to titles and wikitext.
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


_HEADER_NAMESPACES = (
    (-2, "Media"), (-1, "Special"), (0, ""), (1, "Talk"), (2, "User"), (3, "User talk"),
    (4, "Samplepedia"), (5, "Samplepedia talk"), (6, "Image"), (7, "Image talk"),
    (10, "Template"), (11, "Template talk"), (14, "Category"), (15, "Category talk"),
)


def _header() -> str:
    schema = "http://www.mediawiki.org/xml/export-0.3/"
    lines = [
        f'<mediawiki xmlns="{schema}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        f' xsi:schemaLocation="{schema} http://www.mediawiki.org/xml/export-0.3.xsd"'
        ' version="0.3" xml:lang="en">',
        "  <siteinfo>",
        "    <sitename>Samplepedia</sitename>",
        "    <base>http://sample.invalid/wiki/Main_Page</base>",
        "    <generator>rwkv_lib.sample_corpus</generator>",
        "    <case>first-letter</case>",
        "    <namespaces>",
    ]
    for key, name in _HEADER_NAMESPACES:
        if name:
            lines.append(f'      <namespace key="{key}">{name}</namespace>')
        else:
            lines.append(f'      <namespace key="{key}" />')
    lines += ["    </namespaces>", "  </siteinfo>"]
    return "\n".join(lines) + "\n"


def _page(rng: SplitMix64, title: str, page_id: int, rev_id: int, text: str) -> str:
    timestamp = (
        f"{rng.between(2002, 2006)}-{rng.between(1, 12):02d}-{rng.between(1, 28):02d}"
        f"T{rng.below(24):02d}:{rng.below(60):02d}:{rng.below(60):02d}Z"
    )
    if rng.chance(75):
        user = rng.zipf(USERNAMES)
        contributor = (f"        <username>{user}</username>\n"
                       f"        <id>{1000 + 37 * USERNAMES.index(user)}</id>\n")
    else:  # anonymous edits carry an address from the documentation range
        contributor = f"        <ip>192.0.2.{rng.between(1, 254)}</ip>\n"
    extra = "      <minor />\n" if rng.chance(20) else ""
    if rng.chance(60):
        extra += f"      <comment>{_xml_escape(rng.zipf(COMMENTS))}</comment>\n"
    return (
        "  <page>\n"
        f"    <title>{_xml_escape(title)}</title>\n"
        f"    <id>{page_id}</id>\n"
        "    <revision>\n"
        f"      <id>{rev_id}</id>\n"
        f"      <timestamp>{timestamp}</timestamp>\n"
        "      <contributor>\n"
        f"{contributor}"
        "      </contributor>\n"
        f"{extra}"
        f'      <text xml:space="preserve">{_xml_escape(text)}</text>\n'
        "    </revision>\n"
        "  </page>\n"
    )


# Article kinds and how often each appears (out of 100); redirects take the rest.
_KINDS = (
    (34, _town_article),
    (10, _river_article),
    (28, _person_article),
    (14, _species_article),
    (4, _list_article),
)


def generate_sample_corpus(n_bytes: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> bytes:
    """Return exactly `n_bytes` of a made-up MediaWiki XML dump (UTF-8), deterministically.

    Like enwik8, the output is a prefix of a longer dump: it is cut at `n_bytes` wherever
    that falls (possibly inside a tag or a multi-byte character). The same arguments give
    the same bytes on every platform; `SAMPLE_SHA256` pins the default output.
    """
    if n_bytes < 1:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    rng = SplitMix64(seed)
    world = _World(rng)
    writer = _Writer(rng, world)
    counters = [0] * len(_KINDS)
    aliases: list[tuple[str, str]] = []  # (other name, article title) for redirect pages
    parts = [_header()]
    size = len(parts[0].encode("utf-8"))
    page_id, rev_id = 1, 30_000_000
    while size < n_bytes:
        roll = rng.below(100)
        for i, (share, make) in enumerate(_KINDS):
            if roll < share:
                title, text, alias = make(writer, counters[i])
                counters[i] += 1
                if alias is not None:
                    aliases.append((alias, title))
                break
            roll -= share
        else:
            if not aliases:
                continue
            title, target = aliases.pop(rng.below(len(aliases)))
            text = f"#REDIRECT [[{target}]]"
        rev_id += rng.between(1, 90_000)
        page = _page(rng, title, page_id, rev_id, text)
        parts.append(page)
        size += len(page.encode("utf-8"))
        page_id += 1
    return "".join(parts).encode("utf-8")[:n_bytes]
