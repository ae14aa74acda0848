"""Offline synthetic data for the three tasks: deterministic for a seed, sized by config, and learnable.

Learnable means a tiny model trained for a few CPU minutes beats chance: every tool has one clear keyword
that all its request templates share (الطقس for the weather, فندق for hotels, زكاة for zakat, ...; a tiny
model given two unrelated phrasings per tool learns the choice measurably slower), argument values
appear verbatim in the request so they can be copied, dialects differ by their typical openers and
closers, equation lines carry the numbers to copy, and flawed solutions differ from correct ones in a
checkable way.
"""

from __future__ import annotations

import random
from typing import Any

from dagtune.data.math_tasks import eqn_item, solution_pair
from dagtune.data.tools import ToolCatalog, normalize_tool

DIALECTS = ("MSA", "Gulf", "Egyptian", "Levantine", "Maghrebi")
DIALECT_WEIGHTS = (0.3, 0.25, 0.2, 0.15, 0.1)  # roughly the real dataset's mix, Maghrebi still present
OPENERS = {
    "MSA": ("أريد", "أحتاج إلى", "من فضلك أريد", "هل يمكنك مساعدتي في"),
    "Gulf": ("أبغى", "ابي", "ودي", "ممكن تساعدني في"),
    "Egyptian": ("عايز", "عاوز", "محتاج", "ممكن تساعدني في"),
    "Levantine": ("بدي", "كتير بدي", "محتاج", "فيك تساعدني ب"),
    "Maghrebi": ("بغيت", "عافاك بغيت", "خصني", "واش تقدر تعاوني ف"),
}
CLOSERS = {
    "MSA": ("", "من فضلك", "وشكراً لك"),
    "Gulf": ("", "الله يعافيك", "لو سمحت"),
    "Egyptian": ("", "لو سمحت", "بسرعة لو سمحت"),
    "Levantine": ("", "إذا بتريد", "الله يخليك"),
    "Maghrebi": ("", "عافاك", "الله يخليك"),
}
CHITCHAT = {
    "MSA": (
        "كيف حالك اليوم؟",
        "شكراً جزيلاً على مساعدتك",
        "من أنت؟",
        "صباح الخير يا صديقي",
        "أنا سعيد جداً اليوم",
    ),
    "Gulf": ("شلونك اليوم؟", "مشكور ما قصرت", "وش اسمك؟", "صباح الخير يا الغالي", "والله إني مستانس اليوم"),
    "Egyptian": ("إزيك عامل إيه؟", "متشكر أوي", "إنت مين؟", "صباح الفل", "أنا مبسوط النهارده"),
    "Levantine": (
        "كيفك شو أخبارك؟",
        "يسلمو إيديك",
        "مين إنت؟",
        "صباح الخير يا حبيبي",
        "أنا كتير مبسوط اليوم",
    ),
    "Maghrebi": ("كي داير لاباس؟", "بارك الله فيك", "شكون نتا؟", "صباح الخير أخويا", "أنا فرحان بزاف اليوم"),
}

# Second sentences for chit-chat, so negatives are as varied as the requests (few distinct negatives
# would mostly be exact duplicates across splits, and leakage removal would empty the held-out ones).
SMALL_TALK = {
    "MSA": ("أتمنى لك يوماً سعيداً", "سعدت بالحديث معك", "ما أخبارك؟", "أنت لطيف جداً"),
    "Gulf": ("الله يسعدك", "وش أخبارك؟", "يعطيك العافية", "إنت ذوق والله"),
    "Egyptian": ("ربنا يخليك", "أخبارك إيه؟", "إنت جدع أوي", "يومك جميل"),
    "Levantine": ("الله يسعدك", "شو الأخبار؟", "إنت كتير لطيف", "نهارك سعيد"),
    "Maghrebi": ("الله يحفظك", "شنو أخبارك؟", "نتا زوين بزاف", "نهارك مبروك"),
}

CITIES = (
    "الرياض",
    "جدة",
    "دبي",
    "القاهرة",
    "الإسكندرية",
    "بيروت",
    "عمان",
    "دمشق",
    "الدار البيضاء",
    "الرباط",
    "تونس",
    "الدوحة",
    "الكويت",
    "مسقط",
    "مراكش",
    "بغداد",
)
DATES = ("غداً", "بعد غد", "يوم الجمعة", "يوم الأحد", "الأسبوع القادم", "15 مارس", "3 أبريل", "20 يونيو")
CURRENCIES = ("ريال", "درهم", "دينار", "جنيه", "دولار", "يورو")
PEOPLE = ("أحمد", "محمد", "فاطمة", "خالد", "سارة", "يوسف", "مريم", "علي", "ليلى", "عمر")
SPECIALTIES = ("أسنان", "جلدية", "عيون", "أطفال", "قلب", "عظام")
MEDICATIONS = ("باراسيتامول", "أموكسيسيلين", "إيبوبروفين", "أوميبرازول", "ميتفورمين", "لوراتادين")
REMINDERS = ("شرب الماء", "الاجتماع", "صلاة الفجر", "دفع الفاتورة", "الاتصال بأمي", "موعد المدرسة")
TIMES = ("الخامسة مساءً", "السابعة صباحاً", "التاسعة", "العاشرة ليلاً", "الثالثة عصراً")
PHRASES = ("صباح الخير", "أين المحطة", "شكراً جزيلاً", "كم السعر", "أنا جائع")
LANGUAGES = ("الإنجليزية", "الفرنسية", "الألمانية", "التركية", "الإسبانية")
FOODS = ("بيتزا", "شاورما", "برغر", "كبسة", "فلافل", "كشري")
RESTAURANTS = ("البيك", "الطازج", "أبو طارق", "ماما نورة", "الشام")


def prop(kind: str, desc: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "description": desc, **extra}


def tool(name: str, desc: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return normalize_tool(
        {
            "function": {
                "name": name,
                "description": desc,
                "parameters": {"type": "object", "properties": props, "required": required},
            }
        }
    )


STR, INT, NUM = "string", "integer", "number"
# (schema, domain, request templates with {slots}); ARG_SLOTS says which slot fills which argument
SYNTHETIC_TOOLS: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
    (
        tool(
            "get_weather",
            "Get the weather forecast / حالة الطقس",
            {"city": prop(STR, "City"), "days": prop(INT, "Forecast days")},
            ["city"],
        ),
        "weather",
        ("معرفة حالة الطقس في {city}", "توقعات الطقس في {city} لمدة {days} أيام"),
    ),
    (
        tool(
            "get_prayer_times",
            "Prayer times / مواقيت الصلاة",
            {"city": prop(STR, "City")},
            ["city"],
        ),
        "islamic_services",
        ("مواقيت الصلاة في {city}", "معرفة مواعيد الصلاة في مدينة {city}"),
    ),
    (
        tool(
            "calculate_zakat",
            "Calculate zakat / حساب الزكاة",
            {"amount": prop(NUM, "Amount"), "currency": prop(STR, "Currency")},
            ["amount"],
        ),
        "islamic_services",
        ("حساب زكاة مبلغ {amount} {currency}", "معرفة زكاة {amount} {currency}"),
    ),
    (
        tool(
            "search_flights",
            "Search flights / البحث عن رحلات طيران",
            {
                "departure_city": prop(STR, "From"),
                "arrival_city": prop(STR, "To"),
                "departure_date": prop(STR, "Date"),
            },
            ["departure_city", "arrival_city", "departure_date"],
        ),
        "travel",
        ("رحلة طيران من {city} إلى {city2} {date}", "حجز طيران من {city} إلى {city2} {date}"),
    ),
    (
        tool(
            "search_hotels",
            "Search hotels / البحث عن فنادق",
            {"city": prop(STR, "City"), "nights": prop(INT, "Nights")},
            ["city"],
        ),
        "travel",
        ("فندق في {city} لمدة {nights} ليال", "حجز فندق في {city}"),
    ),
    (
        tool(
            "transfer_money",
            "Transfer money / تحويل الأموال",
            {
                "recipient": prop(STR, "Recipient"),
                "amount": prop(NUM, "Amount"),
                "currency": prop(STR, "Currency"),
            },
            ["recipient", "amount"],
        ),
        "banking_finance",
        ("تحويل {amount} {currency} إلى {person}", "تحويل مبلغ {amount} {currency} إلى {person}"),
    ),
    (
        tool(
            "convert_currency",
            "Exchange rate / سعر الصرف",
            {
                "amount": prop(NUM, "Amount"),
                "from_currency": prop(STR, "From"),
                "to_currency": prop(STR, "To"),
            },
            ["amount", "from_currency", "to_currency"],
        ),
        "banking_finance",
        ("سعر صرف {amount} {currency} مقابل {currency2}", "صرف {amount} {currency} إلى {currency2}"),
    ),
    (
        tool(
            "book_doctor_appointment",
            "Book a doctor / حجز موعد طبيب",
            {"specialty": prop(STR, "Specialty"), "date": prop(STR, "Date")},
            ["specialty"],
        ),
        "healthcare",
        ("موعد مع طبيب {specialty} {date}", "حجز موعد عند طبيب {specialty}"),
    ),
    (
        tool(
            "search_medications",
            "Find a medication / البحث عن دواء",
            {"medication_name": prop(STR, "Medication"), "city": prop(STR, "City")},
            ["medication_name"],
        ),
        "healthcare",
        ("البحث عن دواء {medication} في صيدليات {city}", "صيدلية فيها دواء {medication}"),
    ),
    (
        tool(
            "track_shipment",
            "Track a shipment / تتبع شحنة",
            {"tracking_number": prop(STR, "Tracking number")},
            ["tracking_number"],
        ),
        "ecommerce",
        ("تتبع الشحنة رقم {tracking}", "معرفة مكان الشحنة رقم {tracking}"),
    ),
    (
        tool(
            "order_food",
            "Order food / طلب طعام",
            {
                "restaurant": prop(STR, "Restaurant"),
                "items": prop("array", "Items", items={"type": "string"}),
            },
            ["restaurant", "items"],
        ),
        "ecommerce",
        ("طلب {food} من مطعم {restaurant}", "توصيل {food} من مطعم {restaurant}"),
    ),
    (
        tool(
            "set_reminder",
            "Set a reminder / ضبط تذكير",
            {"message": prop(STR, "What"), "time": prop(STR, "When")},
            ["message", "time"],
        ),
        "utilities",
        ("تذكير ب{task} الساعة {time}", "ضبط تذكير ب{task} الساعة {time}"),
    ),
    (
        tool(
            "translate_text",
            "Translate text / ترجمة نص",
            {"text": prop(STR, "Text"), "target_language": prop(STR, "Language")},
            ["text", "target_language"],
        ),
        "utilities",
        ("ترجمة عبارة {phrase} إلى {language}", "ترجمة جملة {phrase} للغة {language}"),
    ),
    (
        tool(
            "check_visa_status",
            "Visa application status / حالة التأشيرة",
            {"application_number": prop(STR, "Application number")},
            ["application_number"],
        ),
        "government_services",
        ("حالة طلب التأشيرة رقم {app}", "متابعة التأشيرة رقم الطلب {app}"),
    ),
]

# Which argument each slot fills, per tool (slots not listed only shape the text).
ARG_SLOTS: dict[str, dict[str, str]] = {
    "get_weather": {"city": "city", "days": "days"},
    "get_prayer_times": {"city": "city"},
    "calculate_zakat": {"amount": "amount", "currency": "currency"},
    "search_flights": {"departure_city": "city", "arrival_city": "city2", "departure_date": "date"},
    "search_hotels": {"city": "city", "nights": "nights"},
    "transfer_money": {"recipient": "person", "amount": "amount", "currency": "currency"},
    "convert_currency": {"amount": "amount", "from_currency": "currency", "to_currency": "currency2"},
    "book_doctor_appointment": {"specialty": "specialty", "date": "date"},
    "search_medications": {"medication_name": "medication", "city": "city"},
    "track_shipment": {"tracking_number": "tracking"},
    "order_food": {"restaurant": "restaurant", "items": "food"},
    "set_reminder": {"message": "task", "time": "time"},
    "translate_text": {"text": "phrase", "target_language": "language"},
    "check_visa_status": {"application_number": "app"},
}


# The keyword every request template of a tool contains and no other tool's template does (what makes the
# tool choice learnable in the tiny profile; tests hold the templates to it).
KEYWORDS: dict[str, str] = {
    "get_weather": "الطقس",
    "get_prayer_times": "الصلاة",
    "calculate_zakat": "زكاة",
    "search_flights": "طيران",
    "search_hotels": "فندق",
    "transfer_money": "تحويل",
    "convert_currency": "صرف",
    "book_doctor_appointment": "طبيب",
    "search_medications": "دواء",
    "track_shipment": "الشحنة",
    "order_food": "مطعم",
    "set_reminder": "تذكير",
    "translate_text": "ترجمة",
    "check_visa_status": "التأشيرة",
}


def synthetic_catalog() -> ToolCatalog:
    catalog = ToolCatalog()
    for schema, _, _ in SYNTHETIC_TOOLS:
        catalog.add(schema)
    return catalog


def two_distinct(rng: random.Random, values: tuple[str, ...]) -> tuple[str, str]:
    a, b = rng.sample(values, 2)
    return a, b


def slot_values(rng: random.Random) -> dict[str, Any]:
    city, city2 = two_distinct(rng, CITIES)
    currency, currency2 = two_distinct(rng, CURRENCIES)
    return {
        "city": city,
        "city2": city2,
        "currency": currency,
        "currency2": currency2,
        "date": rng.choice(DATES),
        "days": rng.randint(2, 7),
        "nights": rng.randint(2, 9),
        "amount": rng.randrange(50, 20001, 50),
        "person": rng.choice(PEOPLE),
        "specialty": rng.choice(SPECIALTIES),
        "medication": rng.choice(MEDICATIONS),
        "tracking": f"TR{rng.randrange(10**7, 10**8)}",
        "app": str(rng.randrange(10**6, 10**7)),
        "food": rng.choice(FOODS),
        "restaurant": rng.choice(RESTAURANTS),
        "task": rng.choice(REMINDERS),
        "time": rng.choice(TIMES),
        "phrase": rng.choice(PHRASES),
        "language": rng.choice(LANGUAGES),
    }


def call_arguments(name: str, template: str, slots: dict[str, Any]) -> dict[str, Any]:
    """Only the arguments whose slot the request mentions: the target never invents a value."""
    args: dict[str, Any] = {}
    for arg, slot in ARG_SLOTS[name].items():
        if "{" + slot + "}" in template:
            args[arg] = [slots[slot]] if arg == "items" else slots[slot]
    return args


def request_text(rng: random.Random, dialect: str, phrase: str) -> str:
    closer = rng.choice(CLOSERS[dialect])
    return " ".join(p for p in (rng.choice(OPENERS[dialect]), phrase, closer) if p)


def chitchat_text(rng: random.Random, dialect: str) -> str:
    text = rng.choice(CHITCHAT[dialect])
    if rng.random() < 0.6:
        text = f"{text} يا {rng.choice(PEOPLE)}"
    if rng.random() < 0.7:
        text = f"{text} {rng.choice(SMALL_TALK[dialect])}"
    closer = rng.choice(CLOSERS[dialect])
    return f"{text} {closer}".strip()


def synthetic_function_calling(
    n: int, negative_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], ToolCatalog]:
    """n requests across the five dialects; tools round-robin (balanced), ~negative_fraction chit-chat."""
    n_neg = round(n * negative_fraction)
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}:synthetic:fc:{i}")
        dialect = rng.choices(DIALECTS, DIALECT_WEIGHTS)[0]
        rid = f"syn-fc-{i:05d}"
        base = {"id": rid, "source": f"synthetic:{i}", "group": rid, "dialect": dialect}
        if i < n_neg:
            rows.append(
                {
                    **base,
                    "user": chitchat_text(rng, dialect),
                    "domain": "unknown",
                    "has_call": False,
                    "target_name": "",
                    "target_arguments": {},
                    "tools": [],
                }
            )
            continue
        schema, domain, templates = SYNTHETIC_TOOLS[(i - n_neg) % len(SYNTHETIC_TOOLS)]
        name = schema["function"]["name"]
        template, slots = rng.choice(templates), slot_values(rng)
        rows.append(
            {
                **base,
                "user": request_text(rng, dialect, template.format(**slots)),
                "domain": domain,
                "has_call": True,
                "target_name": name,
                "target_arguments": call_arguments(name, template, slots),
                "tools": [schema],
            }
        )
    return rows, synthetic_catalog()


# ------------------------------------------------------------------------------------------------
# math: equation lines and word problems (English, like the project's math sources)
# ------------------------------------------------------------------------------------------------
NAMES = ("Sara", "Omar", "Lina", "Karim", "Maya", "Adam", "Noor", "Ziad", "Hana", "Youssef", "Dina", "Sami")
ITEMS = ("apple", "book", "pencil", "marble", "cookie", "sticker", "card", "flower", "coin", "toy")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}

EQ_LINES = {
    "+": (
        "{name} has {a} {item}s and gets {b} more, so {name} has {a} + {b} = {c} {item}s.",
        "Adding the two boxes gives {a} + {b} = {c} {item}s in total.",
    ),
    "-": (
        "{name} had {a} {item}s and gave away {b}, leaving {a} - {b} = {c} {item}s.",
        "After selling {b} of them, {a} - {b} = {c} {item}s remain.",
    ),
    "*": (
        "Each of the {a} bags holds {b} {item}s, so there are {a} * {b} = {c} {item}s.",
        "{name} buys {a} packs of {b} {item}s, which is {a} x {b} = {c} {item}s.",
    ),
    "/": (
        "{name} shares {a} {item}s among {b} friends, so each gets {a} / {b} = {c} {item}s.",
        "Splitting {a} {item}s into {b} equal groups gives {a} / {b} = {c} per group.",
    ),
}
NO_EQ_LINES = (
    "First, we need to find how many {item}s {name} has in total.",
    "{name} wants to know how many {item}s are left after the party.",
    "So the answer is {c} {item}s.",
    "Let us count the {item}s in each of the {b} boxes.",
    "The question asks for the number of {item}s {name} keeps.",
    "We know that {name} started with {a} {item}s.",
)


def operands(rng: random.Random, op: str) -> tuple[int, int, int]:
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    if op == "-" and b > a:
        a, b = b, a
    if op == "/":
        a = b * rng.randint(2, 12)
    return a, b, OPS[op](a, b)


def wrong_result(rng: random.Random, c: int) -> int:
    return c + rng.choice((-10, -3, -2, -1, 1, 2, 3, 10)) if c > 10 else c + rng.choice((1, 2, 3))


def synthetic_extractor(n: int, seed: int) -> list[dict[str, Any]]:
    """Lines with a correct equation (40%), an arithmetic error (30%) or no equation (30%)."""
    rows = []
    for i in range(n):
        rng = random.Random(f"{seed}:synthetic:extractor:{i}")
        op = rng.choice(tuple(OPS))
        a, b, c = operands(rng, op)
        kind = (
            "correct",
            "correct",
            "correct",
            "correct",
            "flawed",
            "flawed",
            "flawed",
            "missing",
            "missing",
            "missing",
        )[i % 10]
        shown = wrong_result(rng, c) if kind == "flawed" else c
        fill = {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), "a": a, "b": b, "c": shown}
        if kind == "missing":
            line, eqn = rng.choice(NO_EQ_LINES).format(**fill), ""
        else:
            line, eqn = rng.choice(EQ_LINES[op]).format(**fill), f"{a}{op}{b}={shown}"
        rows.append(eqn_item(f"syn-ex-{i:05d}", f"synthetic:{i}", line, eqn, kind))
    return rows


PROBLEMS = {
    "+": (
        "{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
        "{name} starts with {a} {item}s and gets {b} more",
    ),
    "-": (
        "{name} has {a} {item}s and gives {b} of them away. How many {item}s are left?",
        "{name} starts with {a} {item}s and gives away {b}",
    ),
    "*": (
        "{name} buys {a} boxes with {b} {item}s in each box. How many {item}s does {name} buy?",
        "There are {a} boxes with {b} {item}s each",
    ),
    "/": (
        "{name} shares {a} {item}s equally among {b} friends. How many {item}s does each friend get?",
        "{a} {item}s are shared among {b} friends",
    ),
}
WRONG_OP = {"+": "-", "-": "+", "*": "+", "/": "*"}
ERROR_TYPES = ("arithmetic", "wrong_operation", "final_answer")


def solution_text(lead: str, a: int, op: str, b: int, result: int, answer: int) -> str:
    return f"{lead}, so {a} {op} {b} = {result}. The answer is {answer}."


def flawed_solution(rng: random.Random, error: str, lead: str, a: int, op: str, b: int, c: int) -> str:
    if error == "arithmetic":  # right operation, wrong result
        w = wrong_result(rng, c)
        return solution_text(lead, a, op, b, w, w)
    if error == "wrong_operation":  # the operation does not match the question, computed correctly
        wop = WRONG_OP[op]
        w = OPS[wop](a, b)
        return solution_text(lead, a, wop, b, w, w)
    return solution_text(lead, a, op, b, c, wrong_result(rng, c))  # final answer disagrees with the work


def synthetic_classifier(n: int, seed: int) -> list[dict[str, Any]]:
    """ceil(n/2) word problems, each as a correct and a flawed solution (one group: same split)."""
    rows: list[dict[str, Any]] = []
    for i in range((n + 1) // 2):
        rng = random.Random(f"{seed}:synthetic:classifier:{i}")
        op = rng.choice(tuple(OPS))
        a, b, c = operands(rng, op)
        fill = {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), "a": a, "b": b}
        question, lead = (t.format(**fill) for t in PROBLEMS[op])
        error = ERROR_TYPES[i % len(ERROR_TYPES)]
        gid, good = f"syn-cl-{i:05d}", solution_text(lead, a, op, b, c, c)
        bad = flawed_solution(rng, error, lead, a, op, b, c)
        rows.extend(solution_pair(gid, f"synthetic:{i}", gid, question, good, bad, error))
    return rows[:n]


# ------------------------------------------------------------------------------------------------
# vocabulary for the tiny models' tokenizers
# ------------------------------------------------------------------------------------------------
# The config's default developer-turn line and no-tool reply (dagtune/config.py; a test keeps them equal).
DEVELOPER_PROMPT = "You are a model that can do function calling with the following functions"
NEGATIVE_REPLY = "لا يحتاج هذا الطلب إلى استدعاء أي أداة."


def tokenizer_corpus(seed: int = 0, n: int = 1500, repeat: int = 30) -> list[str]:
    """Text in the synthetic data's vocabulary, for training the tiny tokenizers (dagtune/models/tiny.py).

    A real model's tokenizer has seen these words: the developer line, tool names, argument keys and
    descriptions, the Arabic request words and slot values come out as a few tokens each, not letter by
    letter. The fixed strings are repeated ``repeat`` times (BPE merges what is frequent); requests and
    calls come from their own seed, not the data set's."""
    fixed: list[str] = [DEVELOPER_PROMPT, NEGATIVE_REPLY]
    for schema, _, templates in SYNTHETIC_TOOLS:
        f = schema["function"]
        props = ",".join(
            f"{k}:{{description:<escape>{p['description']}<escape>,type:<escape>{p['type'].upper()}<escape>}}"
            for k, p in f["parameters"]["properties"].items()
        )
        fixed.append(
            f"declaration:{f['name']}{{description:<escape>{f['description']}<escape>,"
            f"parameters:{{properties:{{{props}}}}}}}"
        )
        fixed.extend(t.replace("{", "").replace("}", "") for t in templates)
    words = (CITIES, DATES, CURRENCIES, PEOPLE, SPECIALTIES, MEDICATIONS, REMINDERS, TIMES, PHRASES)
    words += (LANGUAGES, FOODS, RESTAURANTS)
    for group in (*words, *OPENERS.values(), *CLOSERS.values(), *CHITCHAT.values(), *SMALL_TALK.values()):
        fixed.extend(group)
    lines = fixed * repeat
    rows, _ = synthetic_function_calling(n, 0.2, seed=seed)
    for r in rows:
        lines.append(r["user"])
        if r["has_call"]:
            args = ",".join(f"{k}:<escape>{v}<escape>" for k, v in r["target_arguments"].items())
            lines.append(f"<start_function_call>call:{r['target_name']}{{{args}}}<end_function_call>")
    lines.extend(f"{r['line']} {r['eqn']}" for r in synthetic_extractor(n // 3, seed=seed))
    lines.extend(f"{r['question']} {r['solution']}" for r in synthetic_classifier(n // 3, seed=seed))
    return lines
