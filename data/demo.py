"""Offline demo preference dataset for the LENS reference implementation.

Every row is {"prompt", "chosen", "rejected"}: an everyday user question and two
synthetic answers, where "chosen" is the answer with the higher gold_score.

The gold rule (gold_score) works on ANY text, so it can also judge answers
written by a real LLM. With words = lowercase runs of letters/apostrophes and
digits, n = number of words in the response:

    score = 1.0 * relevance      # prompt keywords the response mentions, max 3
          + 0.5 * helpfulness    # distinct advice markers, max 4
          + 0.5 * politeness     # distinct polite phrases, max 2
          - 1.5 * rudeness       # distinct rude phrases, max 2
          - 2.0 * refused        # 1 if any refusal / "I don't know" phrase
          - length_penalty       # 0.05 per word outside [20, 50], max 2.0

  * prompt keywords: prompt words of >= 3 letters that are not in STOPWORDS;
    one counts as mentioned if some response word has the same first 5 letters.
  * advice markers: words in ADVICE_WORDS (imperative verbs like "use", "try",
    step words like "first", "then") plus one extra marker if any digit appears.
  * politeness, rudeness and refusal phrases are substring matches against the
    lowercased response (lists POLITE, RUDE, REFUSAL below).

Usage:
    python data/demo.py                      # 2000 pairs, seed 0 -> data/demo.jsonl
    python data/demo.py --n-pairs 500 --seed 1 --out /tmp/demo.jsonl
"""
import argparse
import json
import os
import random
import re

# ---------------------------------------------------------------- gold rule --

STOPWORDS = set("""
about after also because been before best could does doing during each easy explain
every from good have help into just know like make many more most much need only other
should simple some still than that their them then there these they thing things this
those tips want ways what when where which while will with would your yours really
beginner complete struggling differently friend says hard keep going quick without
how the and any can you i'm i've what's it's are for but not way its was has had did
get got out own too why who all one new
""".split())

ADVICE_WORDS = set("""
add aim ask avoid begin book break buy change check choose clean cut drink eat feed find
follow get give join keep leave let limit list make measure mix move pick place plan
practice prepare put read remember replace rest review run save schedule set start stop
stretch switch take test track try turn use walk wash water wipe write
first second third then next finally step steps tip
""".split())

POLITE = ["please", "happy to help", "glad", "hope this helps", "good luck",
          "great question", "thank", "you're welcome", "you've got this", "enjoy"]
RUDE = ["stupid", "dumb", "idiot", "lazy", "obviously", "ridiculous",
        "pathetic", "google it", "figure it out", "waste of", "annoying", "not rocket science"]
REFUSAL = ["i don't know", "i do not know", "i can't help", "i cannot help",
           "not able to help", "no idea", "not sure i can", "as an ai", "i won't",
           "can't answer", "cannot answer", "rather not"]


def _words(text):
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))  # curly -> straight apostrophe


def gold_score(prompt: str, response: str) -> float:
    """Score how good `response` is as an answer to `prompt` (see module docstring)."""
    words = _words(response)
    low = " ".join(words)  # normalised text for phrase matching
    stems = {w[:5] for w in words}

    keywords = {w[:5] for w in _words(prompt) if len(w) >= 3 and w not in STOPWORDS}
    relevance = min(len(keywords & stems), 3)
    helpfulness = min(len(ADVICE_WORDS & set(words)) + any(c.isdigit() for c in low), 4)
    politeness = min(sum(p in low for p in POLITE), 2)
    rudeness = min(sum(p in low for p in RUDE), 2)
    refused = any(p in low for p in REFUSAL)
    n = len(words)
    length_penalty = min(0.05 * max(20 - n, n - 50, 0), 2.0)

    score = (1.0 * relevance + 0.5 * helpfulness + 0.5 * politeness
             - 1.5 * rudeness - 2.0 * refused - length_penalty)
    return round(score, 4)  # rounding makes ties exact and the output stable


# ------------------------------------------------------------ text material --

# (task phrase used in the prompt, concrete on-topic tips as imperative clauses)
TOPICS = [
    ("keep my houseplants alive", ["water houseplants only when the top inch of soil is dry", "put them near a bright window out of harsh sun", "use pots with drainage holes", "feed them diluted fertilizer once a month"]),
    ("bake my first loaf of bread", ["weigh the flour instead of using cups", "let the dough rise until it doubles", "bake the loaf at 220 C for about 35 minutes", "let the bread cool before slicing"]),
    ("start running as a beginner", ["alternate one minute of running with two of walking", "buy shoes that fit well at a running store", "run three times a week, not every day", "add only 10 percent more distance each week"]),
    ("make a monthly budget", ["list every fixed bill first", "track spending for a month before setting limits", "set aside savings the day you get paid", "review the budget every Sunday"]),
    ("learn to play guitar", ["practice chords for 15 minutes every day", "start with G, C and D chords", "tune the guitar before every session", "play along with slow songs you love"]),
    ("sleep better at night", ["go to bed at the same time every night", "keep the bedroom cool and dark", "stop screens an hour before sleep", "avoid coffee after 2 pm"]),
    ("cook rice without burning it", ["rinse the rice until the water runs clear", "use about 1.5 cups of water per cup of rice", "simmer covered on the lowest heat", "let the rice rest 10 minutes off the heat"]),
    ("save money on groceries", ["plan meals for the week before shopping", "write a grocery list and stick to it", "buy store brands and staples in bulk", "never shop for food when hungry"]),
    ("learn a new language", ["study vocabulary with flashcards for 20 minutes a day", "listen to podcasts in the language", "find a conversation partner online", "label objects at home with their names"]),
    ("train my puppy to sit", ["hold a treat above the puppy's nose", "say sit once and reward the moment it sits", "keep training sessions under five minutes", "practice in a quiet room first"]),
    ("clean my kitchen faster", ["clear the counters before wiping anything", "wash dishes while the oven is on", "work top to bottom so crumbs fall last", "set a 15 minute timer"]),
    ("grow tomatoes on a balcony", ["choose a pot of at least 20 litres", "give the tomatoes six hours of sun", "water deeply at the base every morning", "tie the stems to a stake as they grow"]),
    ("write a good cover letter", ["open with the exact job you are applying for", "mention two results with numbers", "keep the letter under one page", "match the tone of the company"]),
    ("prepare for a job interview", ["research the company and its products", "practice answers out loud with a friend", "prepare three questions to ask them", "arrive ten minutes early"]),
    ("meditate every day", ["start with five minutes of breathing", "sit at the same time each morning", "use a guided meditation app", "notice wandering thoughts and return to the breath"]),
    ("fix a slow laptop", ["uninstall programs you never use", "check which apps start at boot", "restart the laptop at least once a week", "replace an old hard drive with an SSD"]),
    ("paint a room", ["wash the walls and tape the edges", "use a primer on dark walls", "paint the edges first, then roll the middle", "apply two thin coats of paint"]),
    ("brew better coffee at home", ["buy whole beans and grind them fresh", "use 60 grams of coffee per litre of water", "keep the water just below boiling", "clean the coffee maker monthly"]),
    ("study for exams", ["study in 25 minute blocks with short breaks", "test yourself instead of rereading notes", "start studying two weeks before the exam", "sleep well the night before the exam"]),
    ("start journaling", ["write three sentences every evening", "keep the journal next to your bed", "use prompts like what went well today", "do not worry about grammar"]),
    ("reduce stress at work", ["write a short task list each morning", "take a walk at lunch", "say no to meetings without an agenda", "turn off email alerts for an hour"]),
    ("make friends in a new city", ["join a weekly club or class", "say yes to invitations for the first month", "volunteer at a local event", "invite a coworker for coffee"]),
    ("take better photos with my phone", ["clean the phone lens first", "use the grid to place the subject off centre", "shoot in soft morning light", "tap the screen to set focus"]),
    ("get started with swimming", ["take a few lessons with a swimming coach", "practice breathing with your face in the water", "use a kickboard to train your legs", "swim twice a week"]),
    ("organize my closet", ["take everything out first", "donate clothes you have not worn in a year", "group clothes by type and colour", "use matching hangers"]),
    ("plan a road trip", ["pick a route with stops every two hours", "check the car tyres and oil", "book the first night's hotel in advance", "download offline maps"]),
    ("make healthy breakfasts", ["prepare overnight oats the evening before", "add fruit and a source of protein", "keep boiled eggs in the fridge", "avoid sugary cereals"]),
    ("learn to draw", ["draw simple shapes for ten minutes a day", "copy drawings you admire", "carry a small sketchbook", "practice drawing hands and faces from photos"]),
    ("stop procrastinating", ["break the task into a five minute first step", "put your phone in another room", "use a timer and work until it rings", "reward yourself after finishing"]),
    ("care for a cat", ["feed the cat at set times", "scoop the litter box daily", "book a vet checkup once a year", "give the cat scratching posts"]),
    ("start a vegetable garden", ["start small with one raised bed", "choose easy vegetables like lettuce and beans", "add compost to the soil", "water the garden early in the morning"]),
    ("improve my posture", ["raise your screen to eye level", "stand up and stretch every 30 minutes", "strengthen your back with rows", "keep both feet flat on the floor"]),
    ("negotiate a higher salary", ["research the pay range for your role", "let them name a number first", "list your results with numbers", "practice the conversation with a friend"]),
    ("make my phone battery last longer", ["lower the screen brightness", "turn off background app refresh", "use dark mode", "keep the battery between 20 and 80 percent"]),
    ("bake chocolate chip cookies", ["chill the cookie dough for an hour", "use brown sugar for chewy cookies", "bake at 180 C for 10 minutes", "take them out while the centres look soft"]),
    ("learn to code in Python", ["install Python and write a small script", "practice with short daily coding exercises", "build one tiny project you care about", "read error messages slowly"]),
    ("drink more water", ["keep a bottle on your desk", "drink a glass with every meal", "add lemon or mint for flavour", "set reminders every two hours"]),
    ("keep my car in good shape", ["change the oil every 10,000 km", "check tyre pressure monthly", "wash the car in winter to remove salt", "replace wiper blades every year"]),
    ("host a dinner party", ["choose dishes you can cook ahead", "set the table before guests arrive", "ask about allergies when you invite people", "keep the guest list under eight"]),
    ("read more books", ["read 20 pages before bed", "carry a book or ebook everywhere", "join a book club", "quit books you do not enjoy"]),
    ("get rid of fruit flies", ["set a trap of vinegar with a drop of dish soap", "take out the trash daily", "store ripe fruit in the fridge", "clean the sink drain"]),
    ("do a pull-up at the gym", ["hang from the bar for 30 seconds", "do slow negative pull-ups", "use a resistance band for support", "train pull-ups three times a week"]),
    ("iron a shirt", ["iron the shirt while slightly damp", "start with the collar, then the cuffs", "set the iron to the fabric type", "hang the shirt right after ironing"]),
    ("pack light for travel", ["pick clothes in two or three matching colours", "roll clothes instead of folding them", "limit yourself to two pairs of shoes", "use travel sized toiletries"]),
    ("make a good first impression", ["arrive a few minutes early", "smile and use the person's name", "ask questions and listen", "put your phone away"]),
    ("write a short story", ["start with a character who wants something", "write the first draft fast", "cut scenes that do not move the plot", "read the story aloud when editing"]),
]

PROMPT_TEMPLATES = [
    "How do I {task}?", "What's the best way to {task}?",
    "Any tips to {task}? I'm a complete beginner.",
    "I've been struggling to {task}. What should I do differently?",
    "Can you explain how to {task}?", "What are some simple ways to {task}?",
    "My friend says it's hard to {task}. How would you go about it?",
]

OPENERS = {
    "polite": ["Happy to help!", "Great question.", "Glad you asked!", "Sure, happy to help with this.",
               "Thanks for asking.", "Good question, and glad you're giving it a go."],
    "neutral": ["", "", "Here is what works.", "Okay.", "A few things matter here.", "Short answer below."],
    "rude": ["Obviously, this is basic stuff.", "Such an annoying question. Fine.", "This is a dumb question, but okay.",
             "Ugh, this is annoying, but here you go.", "Honestly, you could just google it."],
}
CLOSINGS = {
    "polite": ["Hope this helps, good luck!", "Good luck, you've got this!", "Enjoy it!",
               "Hope this helps!", "Thanks, and good luck!", "Please ask if anything is unclear."],
    "neutral": ["", "", "That's about it.", "It gets easier over time."],
    "rude": ["Figure it out from there.", "Not that hard, really.", "Stop being lazy about it.",
             "Do what you want, it is not rocket science.", "It's ridiculous how often people ask this."],
}
VAGUE = ["It depends on a lot of factors.", "Everyone is different, so see what feels right.",
         "There are many ways to approach it.", "It can be tricky at times.",
         "Some people find it easy and some don't.", "Results will vary from person to person.",
         "It's a journey more than a destination.", "Just go with the flow and see."]
FILLER = ["Opinions on this vary quite a bit.", "Lots of videos cover this, and they often disagree.",
          "This comes up again and again.", "Habits take a while to form for almost everyone.",
          "Many people get confused at first, which is normal."]
REFUSALS = ["I don't know much about this, sorry.", "I'm not sure I can help with that.",
            "No idea, to be honest.", "I can't help with this one."]
STEP_MARKERS = ["First,", "Then", "Next,", "Also,", "Finally,"]


# --------------------------------------------------------------- generator --

def random_plan(rng):
    """A response 'plan': how many parts of each kind, and in which tone."""
    return {
        "tone_open": rng.choice(["polite", "polite", "neutral", "neutral", "rude"]),
        "tone_close": rng.choice(["polite", "neutral", "neutral", "rude"]),
        "intro": rng.random() < 0.6,         # restates the task -> full relevance
        "tips": rng.choice([0, 1, 2, 2, 3]),
        "offtopic": rng.choice([0, 0, 0, 1, 1]),  # tips from a different topic
        "vague": rng.choice([0, 0, 1, 1, 2]),
        "filler": rng.choice([0, 0, 1, 1, 2]),
        "steps": rng.random() < 0.5,         # "First, ... Then ..." markers
        "refuse": rng.random() < 0.1,
    }


def perturb(plan, rng):
    """Change ONE thing about a plan: gives near-miss pairs with small score gaps."""
    p = dict(plan)
    key = rng.choice(["tone_open", "tone_close", "intro", "tips", "offtopic",
                      "vague", "filler", "steps"])
    if key in ("tone_open", "tone_close"):
        p[key] = rng.choice([t for t in ("polite", "neutral", "rude") if t != p[key]])
    elif key in ("intro", "steps"):
        p[key] = not p[key]
    else:
        p[key] = max(0, p[key] + rng.choice([-1, 1, 2]))
    return p


def render(plan, topic, other, rng):
    """Turn a plan into text. `rng` is seeded per pair so both sides share wording."""
    task, tips = topic
    your_task = task.replace(" my ", " your ").replace("my ", "your ")
    opener = rng.choice(OPENERS[plan["tone_open"]])
    closing = rng.choice(CLOSINGS[plan["tone_close"]])
    chosen_tips = rng.sample(tips, len(tips))[:plan["tips"]]
    off = rng.sample(other[1], len(other[1]))[:plan["offtopic"]]
    vague = rng.sample(VAGUE, 3)[:plan["vague"]]
    filler = rng.sample(FILLER, 3)[:plan["filler"]]
    intro = rng.choice(["To {t}, a few things help.", "If you want to {t}, keep it simple.",
                        "Here's how to {t}."]).format(t=your_task)

    if plan["refuse"]:
        return " ".join(s for s in [opener, rng.choice(REFUSALS)] + vague + [closing] if s)
    parts = [opener] + ([intro] if plan["intro"] else []) + filler[:1]
    advice = list(chosen_tips)
    for tip in off:  # off-topic tips land anywhere, so position gives nothing away
        advice.insert(rng.randrange(len(advice) + 1), tip)
    for i, tip in enumerate(advice):
        marker = ""
        if plan["steps"] and len(advice) > 1:
            marker = STEP_MARKERS[-1] if i == len(advice) - 1 else STEP_MARKERS[min(i, 3)]
        parts.append(f"{marker} {tip}." if marker else tip[0].upper() + tip[1:] + ".")
    parts += vague + filler[1:] + [closing]
    return " ".join(s.strip() for s in parts if s.strip())


def make_demo(n_pairs: int = 2000, seed: int = 0) -> list[dict]:
    """Build `n_pairs` labelled pairs; chosen = higher gold_score, ties skipped."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n_pairs:
        ti = rng.randrange(len(TOPICS))
        topic = TOPICS[ti]
        other = TOPICS[(ti + rng.randrange(1, len(TOPICS))) % len(TOPICS)]
        prompt = rng.choice(PROMPT_TEMPLATES).format(task=topic[0])
        plan_a = random_plan(rng)
        # Most pairs are near misses (one change) -> hard; the rest are independent -> often easy.
        plan_b = perturb(plan_a, rng) if rng.random() < 0.6 else random_plan(rng)
        wording_seed = rng.randrange(2**31)
        a = render(plan_a, topic, other, random.Random(wording_seed))
        b = render(plan_b, topic, other, random.Random(wording_seed))
        sa, sb = gold_score(prompt, a), gold_score(prompt, b)
        if sa == sb or a == b or (prompt, a, b) in seen:
            continue
        seen.add((prompt, a, b))
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-pairs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.jsonl"))
    args = ap.parse_args()

    rows = make_demo(args.n_pairs, args.seed)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)  # atomic: readers never see a half-written file

    gaps = [gold_score(r["prompt"], r["chosen"]) - gold_score(r["prompt"], r["rejected"]) for r in rows]
    print(f"wrote {len(rows)} pairs, {len({r['prompt'] for r in rows})} distinct prompts, "
          f"mean score gap {sum(gaps) / len(gaps):.3f} -> {args.out}")


if __name__ == "__main__":
    main()
