"""Static vocabulary of the demo world: names, titles, antonym pairs and multiple-choice facts.

Everything here is plain data; `corpus.py` turns it into seeded training documents and held-out
evaluation prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

_FIRST_NAMES = """
Sally Mary Sue John Paul Anna Peter James Robert Michael William David Richard Joseph Thomas Charles
Daniel Matthew Anthony Mark Donald Steven Andrew Kenneth Joshua Kevin Brian George Edward Ronald Timothy
Jason Jeffrey Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon Benjamin Samuel
Gregory Frank Alexander Raymond Patrick Jack Dennis Jerry Tyler Aaron Jose Adam Henry Nathan Douglas
Zachary Kyle Walter Ethan Jeremy Harold Keith Christian Roger Noah Gerald Carl Terry Sean Austin Arthur
Lawrence Jesse Dylan Bryan Joe Jordan Billy Bruce Albert Willie Gabriel Logan Alan Juan Wayne Roy Ralph
Randy Eugene Vincent Russell Elijah Louis Bobby Philip Johnny Linda Patricia Jennifer Elizabeth Barbara
Susan Jessica Sarah Karen Nancy Lisa Betty Margaret Sandra Ashley Kimberly Emily Donna Michelle Dorothy
Carol Amanda Melissa Deborah Stephanie Rebecca Sharon Laura Cynthia Kathleen Amy Shirley Angela Helen
Brenda Pamela Nicole Emma Samantha Katherine Christine Debra Rachel Catherine Carolyn Janet Ruth Maria
Heather Diane Virginia Julie Joyce Victoria Olivia Kelly Christina Lauren Joan Evelyn Judith Megan Cheryl
Andrea Hannah Martha Jacqueline Frances Gloria Ann Teresa Kathryn Sara Janice Jean Alice Madison Doris
Abigail Julia Judy Grace Denise Amber Marilyn Beverly Danielle Theresa Sophia Marie Diana Brittany
Natalie Isabella Charlotte Rose Alexis Kayla Oliver Lucas Mason Logan Liam Harry Oscar Leo Freddie Archie
Alfie Theo Arlo Finley Isaac Reuben Toby Felix Hugo Rory Albie Otto Ezra Jude Rufus Louie Ada Ivy Freya
Florence Willow Isla Ella Evie Poppy Daisy Phoebe Matilda Elsie Sienna Maya Esme Harper Lottie Mabel
Edith Imogen Hazel Violet Aurora Iris Nora Clara Bella Lola Ruby Millie Nina Elena Sofia Lucia Marta Pablo
Carlos Diego Miguel Javier Hugo Pedro Luis Marco Giulia Luca Matteo Pierre Louise Camille Manon Chloe
Jules Hugues Yann Elodie Margot Hans Greta Klaus Ingrid Sven Astrid Lars Anya Boris Ivan Olga Dmitri Igor
Yuki Kenji Hiro Mei Ling Wei Chen Ravi Priya Arjun Anil Sunita Kofi Amara Zara Omar Layla Yusuf Fatima
Tariq Nadia Ines Rafael Bruno Felipe Dario Ingo Milo Nico Enzo Vera Tess Gwen Maeve Cormac Declan Niamh
Siobhan Fergus Angus Morag Hamish Bernard Cecil Duncan Edgar Horace Irving Jasper Lionel Monty Percy
Quentin Rupert Stanley Wilbur Agnes Beatrice Cora Delia Edna Fern Gilda Hattie Ida Juno Lena Myra Opal
Pearl Rhoda Stella Thea Una Wanda Yvonne Zelda Tilly Effie
"""

TITLES: tuple[str, ...] = (
    "Aunt",
    "Uncle",
    "Mr.",
    "Mrs.",
    "Dr.",
    "Professor",
    "Grandma",
    "Grandpa",
    "Cousin",
    "Captain",
    "Coach",
    "Miss",
    "Judge",
    "Nurse",
    "Sister",
    "Brother",
)

# Names that must stay in the training pool (the paper's own examples).
_PINNED = ("Sally", "Mary", "Sue", "John", "Paul", "Anna")


def _dedup(words: str) -> list[str]:
    seen: dict[str, None] = {}
    for w in words.split():
        seen.setdefault(w, None)
    return list(seen)


ALL_NAMES: tuple[str, ...] = tuple(_dedup(_FIRST_NAMES))
# Every 9th name (skipping pinned ones) is held out: it never appears in training text.
HELDOUT_NAMES: tuple[str, ...] = tuple(n for i, n in enumerate(ALL_NAMES) if i % 9 == 4 and n not in _PINNED)
TRAIN_NAMES: tuple[str, ...] = tuple(n for n in ALL_NAMES if n not in set(HELDOUT_NAMES))


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in text.split():
        a, b = item.split("/")
        out.append((a, b))
    return tuple(out)


ANTONYMS_EN: tuple[tuple[str, str], ...] = _pairs(
    """small/big hot/cold up/down fast/slow happy/sad light/dark old/young open/closed high/low
    rich/poor strong/weak hard/soft long/short early/late wet/dry full/empty loud/quiet clean/dirty
    thick/thin good/bad true/false near/far inside/outside win/lose buy/sell push/pull left/right
    first/last begin/end love/hate alive/dead cheap/expensive safe/dangerous wide/narrow deep/shallow
    sharp/dull above/below before/after day/night north/south east/west black/white always/never
    friend/enemy question/answer give/take arrive/leave remember/forget sweet/sour smooth/rough
    huge/tiny asleep/awake accept/refuse more/less everything/nothing"""
)

ANTONYMS_FR: tuple[tuple[str, str], ...] = _pairs(
    """petit/grand chaud/froid haut/bas rapide/lent heureux/triste clair/sombre vieux/jeune
    ouvert/fermé riche/pauvre fort/faible dur/mou tôt/tard mouillé/sec plein/vide bruyant/silencieux
    propre/sale épais/mince lourd/léger bon/mauvais vrai/faux près/loin dedans/dehors gagner/perdre
    acheter/vendre pousser/tirer gauche/droite premier/dernier commencer/finir aimer/détester
    vivant/mort facile/difficile jour/nuit nord/sud noir/blanc toujours/jamais ami/ennemi
    donner/prendre arriver/partir sucré/salé entrer/sortir monter/descendre beau/laid gros/maigre
    rire/pleurer avant/après dessus/dessous début/fin plus/moins tout/rien allumer/éteindre
    souvent/rarement chercher/trouver nouveau/ancien"""
)


@dataclass(frozen=True)
class Fact:
    """One fact of the world: a question, its statement stem (value appended) and its answer."""

    category: str
    question: str
    stem: str  # "The capital of France is" -> stem + " " + value
    value: str


def _facts() -> tuple[Fact, ...]:
    out: list[Fact] = []
    capitals = """France:Paris Italy:Rome Spain:Madrid Germany:Berlin Japan:Tokyo Egypt:Cairo
    Russia:Moscow Greece:Athens Canada:Ottawa Peru:Lima Kenya:Nairobi China:Beijing Norway:Oslo
    Poland:Warsaw Ireland:Dublin Portugal:Lisbon"""
    for pair in capitals.split():
        c, v = pair.split(":")
        out.append(Fact("capital", f"What is the capital of {c}?", f"The capital of {c} is", v))
    colors = """banana:yellow grass:green sky:blue snow:white coal:black tomato:red carrot:orange
    lemon:yellow cherry:red lime:green plum:purple crow:black milk:white pumpkin:orange"""
    for pair in colors.split():
        o, v = pair.split(":")
        out.append(Fact("color", f"What color is a {o}?", f"The color of a {o} is", v))
    sounds = "dog:woof cat:meow cow:moo duck:quack pig:oink sheep:baa horse:neigh snake:hiss lion:roar bee:buzz"
    for pair in sounds.split():
        a, v = pair.split(":")
        out.append(Fact("sound", f"What sound does a {a} make?", f"The sound of a {a} is", v))
    legs = "spider:eight dog:four bird:two ant:six snake:zero horse:four octopus:eight beetle:six"
    for pair in legs.split():
        a, v = pair.split(":")
        out.append(Fact("legs", f"How many legs does a {a} have?", f"The number of legs of a {a} is", v))
    years = [
        ("World War II end", "World War II ended in", "1945"),
        ("World War I begin", "World War I began in", "1914"),
        ("the Titanic sink", "The Titanic sank in", "1912"),
        ("the Berlin Wall fall", "The Berlin Wall fell in", "1989"),
        ("the first moon landing happen", "The first moon landing happened in", "1969"),
        ("Columbus reach America", "Columbus reached America in", "1492"),
        ("the French Revolution begin", "The French Revolution began in", "1789"),
        ("the American Civil War end", "The American Civil War ended in", "1865"),
    ]
    for q, stem, v in years:
        out.append(Fact("year", f"In what year did {q}?", stem, v))
    langs = """Brazil:Portuguese Mexico:Spanish Austria:German Egypt:Arabic Japan:Japanese Italy:Italian
    France:French Russia:Russian Greece:Greek China:Chinese"""
    for pair in langs.split():
        c, v = pair.split(":")
        out.append(Fact("language", f"What language is spoken in {c}?", f"The language of {c} is", v))
    return tuple(out)


FACTS: tuple[Fact, ...] = _facts()


def category_values(category: str) -> list[str]:
    """Distinct values of one fact category, in first-seen order (the distractor pool)."""
    return list(dict.fromkeys(f.value for f in FACTS if f.category == category))


PLACES = (
    "park",
    "market",
    "station",
    "library",
    "garden",
    "school",
    "beach",
    "farm",
    "river",
    "forest",
    "kitchen",
    "office",
    "museum",
    "harbor",
    "village",
    "city",
    "bakery",
    "church",
    "bridge",
    "hill",
)
OBJECTS = (
    "book",
    "hat",
    "cup",
    "box",
    "bag",
    "lamp",
    "chair",
    "kite",
    "ball",
    "coat",
    "bike",
    "key",
    "letter",
    "basket",
    "clock",
    "map",
    "ring",
    "shoe",
    "umbrella",
    "bottle",
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray")
ADJECTIVES = ("old", "new", "small", "big", "heavy", "bright", "quiet", "strange", "lovely", "broken")
