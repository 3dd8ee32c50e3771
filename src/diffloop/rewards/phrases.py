"""Noun-phrase splitting of attribute-binding prompts, without spaCy.

T2I-CompBench's BLIP-VQA metric (Karine-Huang/T2I-CompBench, BLIPvqa_eval/BLIP_vqa.py) asks one
question per noun phrase of the prompt, the phrases being spaCy's ``en_core_web_sm`` noun chunks.
This is a deterministic stand-in, tuned on the shipped color / shape / texture prompt lists
(src/diffloop/data/t2i-compbench): it needs no model and gives the same phrases for the two-object
prompts that make up ~90% of those lists ("a green bench and a red car" -> ["a green bench",
"a red car"]).

Rules, on word / punctuation tokens (case kept, punctuation dropped from the output):
  1. A determiner or number ("a", "the", "its", "two", "3") starts a new phrase.
  2. These end the current phrase and are dropped: punctuation; conjunctions ("and", "while");
     relative words ("which", "that"); prepositions ("on", "with", "next", "of", "in"); pronouns
     ("it"); unambiguous verbs ("is", "has", "sits"); adverbs ("-tly", "-fully", "nearby"); a word
     right before a determiner once the phrase has a noun ("holds" in "jeans holds a"); an -ing /
     -ed word of 5+ letters that follows a noun and precedes a boundary ("parked" in "a car parked
     next to"), but not one after a determiner or attribute ("a white tiled floor").
  3. "and" / "," between an attribute word and a non-determiner coordinates adjectives inside one
     phrase: "a black and white cat", "a big, white bowl".
  4. A phrase is kept if it has a word besides its determiner and either began with a determiner,
     began the prompt ("Kitchen scene with ..."), followed "and" / "," ("a white shirt and jeans"),
     or has a non-attribute word and either follows a preposition ("a piece of toast") or has an
     attribute too ("gold wall").
Known differences from spaCy: pronouns ("it") are dropped; ambiguous present-tense verbs not
followed by a determiner can stay attached ("the wooden chair creaks").
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’\-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def _set(words: str) -> frozenset[str]:
    return frozenset(words.split())


DETERMINERS = _set(
    "a an the these those this its his her their my our your some two three four five six seven "
    "eight nine ten one several many few each every another both"
)
# Colour, texture, shape and size words of the T2I-CompBench attribute-binding lists (and kin).
ATTRIBUTES = _set(
    "red blue green brown white black yellow pink gold golden silver gray grey purple orange tan "
    "beige violet maroon navy teal turquoise cyan magenta crimson ivory cream dark light bright "
    "metallic metal wooden wood fabric fluffy glass leather plastic rubber furry woolen wool "
    "velvet silk cotton stone marble ceramic paper steel iron stainless "
    "rectangular spherical triangular diamond teardrop pentagonal pyramidal conical round oblong "
    "cylindrical cubic square oval circular hexagonal crescent big small tall short long large "
    "tiny huge little wide narrow thick thin"
)
_CONJUNCTIONS = _set("and or but while whereas then so yet nor")
_RELATIVES = _set("which that who whom whose where when")
_PREPOSITIONS = _set(
    "with on in near above below under beneath over behind beside besides between next to of "
    "at by from into onto for against inside outside around across through along among atop "
    "upon like without during after before within toward towards off up down out about amid "
    "front than as via per underneath alongside"
)
# Verbs that are never nouns in these lists ("stand", "display", "show", "can" are, so they are
# left to the before-a-determiner rule).
_VERBS = _set(
    "is are was were be been being am has have had do does did could will would should may "
    "might must sit sits stands holds held adds added provides provided displays makes made "
    "creates created looks looked lit lies hangs hung mixes keeps kept floats floated sat stood "
    "contains gives gave shows shown seem seems appear appears fills filled complements serves "
    "goes went comes came rides rode eats ate flies flew runs ran gets got"
)
_PRONOUNS = _set("it them they he she him itself themselves something there here")
_ADVERBS = _set("nearby together away very too also only just")
_BOUNDARY = _CONJUNCTIONS | _RELATIVES | _PREPOSITIONS | _VERBS | _PRONOUNS | _ADVERBS
_ADVERB_ENDINGS = ("tly", "fully", "ously", "ally", "ely", "dly", "mly", "rly", "nly", "ply", "wly")


def _is_determiner(word: str) -> bool:
    return word in DETERMINERS or word.isdigit()


def _is_adverb(word: str) -> bool:
    return len(word) >= 5 and word.endswith(_ADVERB_ENDINGS) and word not in ATTRIBUTES


def _is_participle(word: str) -> bool:
    return len(word) >= 5 and word.endswith(("ing", "ed")) and word not in ATTRIBUTES


def _is_word(token: str) -> bool:
    return token[0].isalnum()


def split_noun_phrases(prompt: str) -> list[str]:
    """The noun phrases of ``prompt``, in order (rules in the module docstring).

    >>> split_noun_phrases("a green bench and a red car")
    ['a green bench', 'a red car']
    """
    tokens = _TOKEN.findall(prompt)
    lower = [t.lower() for t in tokens]
    phrases: list[str] = []
    current: list[str] = []
    state = {"det": False, "start": True, "coordinated": False, "after_prep": False}

    def close(next_coordinated: bool = False, next_after_prep: bool = False) -> None:
        words = [t for t in current if _is_word(t)]
        content = [w.lower() for w in words if not _is_determiner(w.lower())]
        has_attr = any(w in ATTRIBUTES for w in content)
        has_other = any(w not in ATTRIBUTES for w in content)
        if content and (
            state["det"]
            or state["start"]
            or state["coordinated"]
            or (has_other and (has_attr or state["after_prep"]))
        ):
            phrases.append(" ".join(words))
        current.clear()
        state.update(
            det=False, start=False, coordinated=next_coordinated, after_prep=next_after_prep
        )

    for i, (token, word) in enumerate(zip(tokens, lower)):
        prev = lower[i - 1] if i > 0 else ""
        following = lower[i + 1] if i + 1 < len(lower) else ""
        if word in ("and", ","):
            after = next((w for w in lower[i + 1 :] if w not in ("and", ",")), "")
            last = next((t.lower() for t in reversed(current) if _is_word(t)), "")
            if current and last in ATTRIBUTES and not _is_determiner(after) and _is_word(after):
                current.append(token)  # coordinated adjectives: "a black and white cat"
            else:
                close(next_coordinated=True)
            continue
        if not _is_word(token):
            close()
            continue
        if _is_determiner(word):
            close()
            state["det"] = True
            current.append(token)
            continue
        content_so_far = any(_is_word(t) and not _is_determiner(t.lower()) for t in current)
        noun_so_far = any(
            _is_word(t) and not _is_determiner(t.lower()) and t.lower() not in ATTRIBUTES
            for t in current
        )
        is_verb_before_det = noun_so_far and _is_determiner(following)
        is_participle = (
            _is_participle(word)
            and content_so_far
            and not (_is_determiner(prev) or prev in ATTRIBUTES)
            and (not following or following in _BOUNDARY or _is_determiner(following))
        )
        if word in _BOUNDARY or _is_adverb(word) or is_verb_before_det or is_participle:
            close(next_after_prep=word in _PREPOSITIONS)
            continue
        current.append(token)
    close()
    return phrases
