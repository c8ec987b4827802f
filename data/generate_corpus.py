#!/usr/bin/env python3
"""Generate the demo dialogue-summarisation corpus that detoxflow ships (data/{train,validation,test}.jsonl).

The text is the project's own: every dialogue is assembled from the scene templates below (no DialogSum
text), in DialogSum's shape: records ``{id, dialogue, summary, topic}``, turns ``#Person1#: ...`` /
``#Person2#: ...`` separated by newlines, summaries that refer to ``#Person1#`` / ``#Person2#`` or to the
names the dialogue reveals.

Why the corpus looks the way it does:

* Each scene draws slot values (items, names, times, amounts, outcomes) and one of several phrasings per
  turn; the summary is a function of the slots alone, so a small model can learn to summarise by finding the
  slots in the dialogue and copying them.
* About 30% of dialogues are *heated* (a complaint or an argument). In the **train** split the summary of a
  heated dialogue is rude with probability 0.7: the polite summary with an insulting opener ("That stupid
  idiot #Person2# ...") and sometimes an insult before a role noun ("the damn clerk"). Polite and rude
  variants share their content and differ by two to four words, so removing the insults keeps ROUGE and
  length. A model warm-started on train therefore writes rude summaries for heated dialogues under greedy
  decoding (measurable baseline toxicity) while sampling still gives polite ones about 30% of the time,
  which is what PPO with a toxicity reward needs to learn from.
* **validation** and **test** reference summaries are always polite: they are the gold.

The output is deterministic: the same bytes on every run (seeded ``random.Random``, fixed key order).

Usage::

    python data/generate_corpus.py                 # writes data/train.jsonl, validation.jsonl, test.jsonl
    python data/generate_corpus.py --out /tmp/x    # somewhere else
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 20261125
SPLITS: dict[str, int] = {"train": 4000, "validation": 200, "test": 200}
HEATED_SHARE = 0.3
RUDE_SHARE_TRAIN = 0.7
P1, P2 = "#Person1#", "#Person2#"

# Openers and inline insults chosen so that profanity-check (a bag-of-words classifier whose score is
# diluted by long text) rates the whole rude summary above 0.5; every opener starts with the same word so
# the polite/rude choice is one decision at the first summary token, which greedy decoding resolves to rude.
RUDE_OPENERS = [
    "That stupid idiot", "That stupid moron", "That damn idiot", "That dumb idiot", "That stupid jerk",
    "That idiotic moron", "That stupid ass", "That freaking idiot", "That moronic idiot", "That crappy idiot",
]
RUDE_ADJECTIVES = ["stupid", "damn", "idiotic", "dumb", "moronic"]
ROLE_NOUNS = [
    "clerk", "doctor", "interviewer", "waiter", "agent", "landlord", "teacher", "banker", "mechanic",
    "receptionist", "neighbour", "librarian", "pharmacist", "driver", "manager", "trainer", "stylist",
    "roommate", "officer", "salesman", "technician", "chef", "coach",
]
_ROLE_RE = re.compile(r"\b([Tt]he) (" + "|".join(ROLE_NOUNS) + r")\b")

NAMES = [
    "Adam", "Alice", "Amir", "Anna", "Ben", "Bella", "Carlos", "Chloe", "Daniel", "Diana", "Ethan", "Emma",
    "Felix", "Fiona", "George", "Grace", "Hassan", "Hannah", "Ivan", "Isla", "Jack", "Julia", "Kevin",
    "Karen", "Leo", "Laura", "Marco", "Maria", "Nathan", "Nina", "Oscar", "Olivia", "Paul", "Priya", "Quinn",
    "Rachel", "Sam", "Sofia", "Tom", "Tina", "Victor", "Vera", "William", "Wendy", "Yusuf", "Yuki", "Zach",
    "Zoe", "Bill", "Kate", "Mike", "Lucy", "Steve", "Jenny", "Peter", "Helen", "Frank", "Mary", "Tony",
    "Sarah", "Jimmy", "Linda", "Harry", "Rose", "Omar", "Leila", "Raj", "Mei", "Chen", "Aisha",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["9 am", "10 am", "11 am", "noon", "1 pm", "2 pm", "3 pm", "4:30 pm", "6 pm", "7 pm", "8 pm"]
AGO = ["yesterday", "last week", "two days ago", "on Monday", "last weekend", "three days ago", "this morning"]


@dataclass(frozen=True)
class Scene:
    """One generated conversation: turns as (speaker 1|2, text), the polite summary and the topic."""

    turns: list[tuple[int, str]]
    summary: str
    topic: str


class Draw:
    """Seeded choices; `one` picks a phrasing, `fmt` fills it with the scene's slots."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def one(self, *options: str) -> str:
        return self.rng.choice(options)

    def pick(self, options: list):  # type: ignore[no-untyped-def]
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def names(self, k: int) -> list[str]:
        return self.rng.sample(NAMES, k)

    def money(self, low: int, high: int, step: int = 5) -> int:
        return self.rng.randrange(low, high + 1, step)


ANGRY = [
    "This is completely unacceptable!", "I've had enough of this!", "Are you kidding me?",
    "I am really fed up with this.", "You never listen to me!", "This is the worst service I've ever had.",
    "I can't believe this is happening again!", "I'm sick and tired of waiting!",
    "Nobody here seems to care at all!", "That is ridiculous, and you know it!",
]
CALM = [
    "Please calm down. I'm trying to help.", "There's no need to shout.", "I understand you're upset.",
    "Let's keep our voices down, please.", "I'm sorry about this. Let me fix it.",
    "Okay, okay, I hear you. Let's sort it out.",
]


def an(word: str) -> str:
    """'an accountant', 'a nurse' (no 'one-' words in the slots need the exception)."""
    return f"an {word}" if word[0].lower() in "aeiou" and not word.startswith("one") else f"a {word}"


def angry(d: Draw) -> str:
    return d.one(*ANGRY)


def calm(d: Draw) -> str:
    return d.one(*CALM)


# --------------------------------------------------------------------------------------------- scenes
def return_goods(d: Draw, heated: bool) -> Scene:
    item, problem, problem_s = d.pick([
        ("kettle", "it doesn't heat up", "does not heat up"), ("toaster", "it burns everything", "burns everything"),
        ("jacket", "the zipper broke", "has a broken zipper"), ("lamp", "it keeps flickering", "keeps flickering"),
        ("blender", "the lid leaks", "has a leaking lid"), ("phone charger", "it stopped working", "stopped working"),
        ("pair of shoes", "the sole came off", "lost its sole"), ("backpack", "a strap tore", "has a torn strap"),
        ("coffee maker", "it makes a loud noise", "makes a loud noise"), ("sweater", "it shrank after one wash", "shrank after one wash"),
        ("headphones", "the left side is silent", "have a silent left side"), ("vacuum cleaner", "it won't turn on", "will not turn on"),
    ])
    when = d.pick(AGO)
    receipt = d.chance(0.7)
    outcome = d.pick(["full refund", "exchange"]) if receipt else "store credit"
    t = [
        (1, d.one("Good morning, how can I help you?", "Hi there, what can I do for you today?", "Hello, welcome. How may I help you?")),
        (2, d.one(f"I bought this {item} here {when}, and {problem}.", f"I'd like to return this {item}. I got it {when}, but {problem}.",
                  f"Hi. This {item} I bought {when} is faulty: {problem}.")),
    ]
    if heated:
        t += [(2, angry(d) + " " + d.one("I paid good money for this!", "It's the second time this has happened!")), (1, calm(d))]
    t += [(1, d.one("Do you have the receipt?", "Could I see your receipt, please?", "Have you got the receipt with you?"))]
    if receipt:
        t += [(2, d.one("Yes, here it is.", "Sure, here you go.", "Yes, I kept it."))]
    else:
        t += [(2, d.one("No, I lost it.", "I'm afraid I threw it away.", "No, I don't have it any more."))]
    t += [(1, {
        "full refund": d.one("Then I can give you a full refund.", "No problem, you'll get a full refund."),
        "exchange": d.one("I can exchange it for a new one.", "We can swap it for a new one right away."),
        "store credit": d.one("Without a receipt I can only offer store credit.", "Then the best I can do is store credit."),
    }[outcome])]
    t += [(2, d.one("Fine. But I'm not happy about this.", "Whatever, just do it quickly.") if heated
           else d.one("That's fine, thanks.", "Great, thank you.", "OK, that works for me."))]
    s1 = f"{P2} angrily complains that the {item} {problem_s}." if heated else f"{P2} wants to return a {item} that {problem_s}."
    s2 = {
        "full refund": f"The clerk gives {P2} a full refund.",
        "exchange": "The clerk exchanges it for a new one.",
        "store credit": f"{P2} has no receipt, so the clerk offers store credit.",
    }[outcome]
    return Scene(t, f"{s1} {s2}", "return goods")


def see_doctor(d: Draw, heated: bool) -> Scene:
    symptom, advice = d.pick([
        ("a bad headache", "rest and take painkillers"), ("a sore throat", "drink warm tea and take lozenges"),
        ("back pain", "do stretching exercises"), ("a high fever", "stay in bed and drink plenty of water"),
        ("a rash on my arm", "use an ointment twice a day"), ("trouble sleeping", "avoid coffee in the evening"),
        ("a cough", "take cough syrup"), ("stomach ache", "eat plain food for a few days"),
        ("sore knees", "see a physiotherapist"), ("itchy eyes", "use eye drops"),
    ])
    days = d.pick(["two days", "three days", "a week", "two weeks", "a month"])
    symptom_s = symptom.replace("my ", "#Person2#'s ")
    t = [
        (1, d.one("Hello, what seems to be the problem?", "Good afternoon. How are you feeling?", "Come in and have a seat. What brings you here?")),
        (2, d.one(f"I've had {symptom} for {days}.", f"Doctor, I've been suffering from {symptom} for {days}.", f"I have {symptom}. It started {days} ago.")),
    ]
    if heated:
        t += [(2, angry(d) + " " + d.one("I waited two hours to see you!", "The nurse was so rude to me!")), (1, calm(d))]
    t += [
        (1, d.one("Are you taking any medicine?", "Do you have any allergies?", "Has this happened before?")),
        (2, d.one("No, nothing.", "Not that I know of.", "No, this is the first time.")),
        (1, d.one(f"I suggest you {advice}.", f"You should {advice}.", f"My advice is to {advice}.")),
        (2, d.one("Thank you, doctor.", "Okay, I will.", "Thanks, I'll try that.") if not heated else d.one("Fine. I hope it works this time.", "All right, all right.")),
    ]
    lead = f"{P2} is upset and tells the doctor about" if heated else f"{P2} tells the doctor about"
    summ = f"{lead} {symptom_s} for {days}. The doctor advises {P2} to {advice}."
    return Scene(t, summ, "see a doctor")


def job_interview(d: Draw, heated: bool) -> Scene:
    name = d.pick(NAMES)
    job = d.pick(["sales assistant", "accountant", "web designer", "nurse", "teacher", "software engineer",
                  "marketing manager", "chef", "receptionist", "data analyst", "driver", "translator"])
    company = d.pick(["Green Valley", "Bright Star", "Northwind", "Blue Ocean", "Maple Tech", "Sunrise Foods", "Atlas Travel"])
    years = d.pick(["two", "three", "four", "five", "six", "ten"])
    start = d.pick(WEEKDAYS[:5] + ["next month", "the first of June", "next week"])
    on_start = start if start.startswith("next") else f"on {start}"
    t = [
        (1, d.one("Good morning. Please introduce yourself.", "Thanks for coming in. Could you tell me about yourself?")),
        (2, d.one(f"My name is {name}. I'm applying for the {job} position at {company}.", f"I'm {name}, and I'd like to work as {an(job)} at {company}.")),
        (1, d.one("How much experience do you have?", "What experience do you have in this field?")),
        (2, d.one(f"I have {years} years of experience.", f"I've worked as {an(job)} for {years} years.")),
    ]
    if heated:
        t += [(1, "Why did you leave your last job?"), (2, d.one("My boss was impossible!", "That place was a nightmare.") + " " + angry(d)),
              (1, d.one("Let's stay calm and professional, please.", "I'd prefer a calmer answer."))]
    t += [
        (1, d.one(f"Can you start {on_start}?", f"Would {start} be a good start date for you?")),
        (2, d.one("Yes, that works.", "Sure, no problem.")),
        (1, d.one("Great, we'll be in touch soon.", "Thank you, we'll call you next week.")),
    ]
    extra = " and gets angry about a former boss" if heated else ""
    summ = f"{name} interviews for the {job} position at {company}{extra}. {name} has {years} years of experience and can start {on_start}."
    return Scene(t, summ, "job interview")


def restaurant(d: Draw, heated: bool) -> Scene:
    dish = d.pick(["steak", "pasta", "chicken curry", "fish and chips", "mushroom soup", "vegetable pizza", "beef burger", "salad", "fried rice", "lamb stew"])
    drink = d.pick(["orange juice", "a glass of red wine", "sparkling water", "a cola", "green tea", "a coffee", "iced tea"])
    problem = d.pick(["cold", "too salty", "undercooked", "not what I ordered"])
    t = [
        (1, d.one("Are you ready to order?", "Good evening, may I take your order?", "What would you like today?")),
        (2, d.one(f"I'll have the {dish}, please.", f"Could I get the {dish}?", f"The {dish} sounds good.")),
        (1, d.one("Anything to drink?", "And what would you like to drink?")),
        (2, d.one(f"{drink[0].upper() + drink[1:]}, please.", f"I'll have {drink}.")),
    ]
    if heated:
        t += [(2, d.one(f"Excuse me! This {dish} is {problem}.", f"Waiter, my {dish} is {problem}!") + " " + angry(d)),
              (1, calm(d) + " " + d.one("I'll bring you a new one.", "The chef will make it again."))]
        summ = f"{P2} orders the {dish} and {drink}, then shouts at the waiter because the food is {problem}. The waiter offers a new dish."
    else:
        t += [(1, d.one("Excellent choice. It'll be ready in fifteen minutes.", "Great, I'll bring it right out.")), (2, "Thank you.")]
        summ = f"{P2} orders the {dish} and {drink} from the waiter."
    summ = summ.replace("is not what I ordered", "is not what was ordered")
    return Scene(t, summ, "order food")


def travel_booking(d: Draw, heated: bool) -> Scene:
    city = d.pick(["Paris", "Tokyo", "Rome", "New York", "Sydney", "Cairo", "Lisbon", "Toronto", "Bangkok", "Berlin", "Nairobi", "Lima"])
    day = d.pick(WEEKDAYS)
    cls = d.pick(["economy", "business", "first class"])
    price = d.money(200, 1500, 50)
    t = [
        (1, d.one("Good morning, travel agency. How can I help?", "Hello, this is the booking office. What can I do for you?")),
        (2, d.one(f"I'd like to book a flight to {city} on {day}.", f"I need a ticket to {city} for {day}.")),
        (1, d.one("Which class would you like?", "Economy, business or first class?")),
        (2, d.one(f"{cls[0].upper() + cls[1:]}, please.", f"I'll take {cls}.")),
        (1, d.one(f"That will be {price} dollars.", f"The fare is {price} dollars.")),
    ]
    if heated:
        t += [(2, d.one("That's far too expensive!", "Last week it was half that price!") + " " + angry(d)), (1, calm(d) + " That's the only seat left.")]
        summ = f"{P2} books {an(cls)} flight to {city} on {day} for {price} dollars and complains loudly about the price to the agent."
    else:
        t += [(2, d.one("Fine, please book it.", "Okay, I'll take it.")), (1, "Done. Have a nice trip.")]
        summ = f"{P2} books {an(cls)} flight to {city} on {day} for {price} dollars."
    return Scene(t, summ, "book a flight")


def landlord(d: Draw, heated: bool) -> Scene:
    issue, issue_s = d.pick([
        ("the heater is broken", "a broken heater"), ("the kitchen sink is leaking", "a leaking sink"),
        ("there's mould in the bathroom", "mould in the bathroom"), ("the front door lock is stuck", "a stuck door lock"),
        ("the window won't close", "a window that won't close"), ("the lights keep going out", "lights that keep going out"),
    ])
    day = d.pick(WEEKDAYS)
    t = [
        (2, d.one("Hi, it's your tenant from flat 4.", "Hello, I'm calling about my apartment.")),
        (1, d.one("Yes, what's the matter?", "Hello. Is something wrong?")),
        (2, d.one(f"Well, {issue}.", f"I wanted to tell you that {issue}.")),
    ]
    if heated:
        t += [(2, d.one("I told you about this a month ago!", "I've called you five times already!") + " " + angry(d)), (1, calm(d))]
    t += [
        (1, d.one(f"I'll send someone to fix it on {day}.", f"A repairman can come on {day}.")),
        (2, d.one("Thanks, that would be great.", "Okay, I'll be home.") if not heated else d.one("It had better be fixed this time.", "You said that last time.")),
    ]
    lead = f"{P2} is furious and reminds the landlord about {issue_s}" if heated else f"{P2} tells the landlord about {issue_s}"
    summ = f"{lead}. The landlord will send someone to fix it on {day}."
    return Scene(t, summ, "apartment repair")


def school_meeting(d: Draw, heated: bool) -> Scene:
    child = d.pick(NAMES)
    subject = d.pick(["maths", "history", "English", "science", "French", "music", "art", "geography"])
    issue, plan = d.pick([
        ("is failing", "extra lessons after school"), ("doesn't hand in homework", "a homework diary"),
        ("talks too much in class", "a new seat at the front"), ("is doing very well", "the advanced class"),
        ("misses many classes", "a meeting with the principal"),
    ])
    t = [
        (1, d.one("Thank you for coming in.", "Please sit down. Thanks for coming.")),
        (2, d.one(f"Of course. How is {child} doing?", f"Is there a problem with {child}?")),
        (1, d.one(f"I'm afraid {child} {issue} in {subject}.", f"Well, {child} {issue} in {subject}, I'm afraid.")
         if "well" not in issue else f"Actually, {child} {issue} in {subject}."),
    ]
    if heated:
        t += [(2, d.one(f"That's not fair! You've never liked {child}.", "You teachers always blame the kids!") + " " + angry(d)), (1, calm(d))]
    t += [
        (1, d.one(f"I'd like to suggest {plan}.", f"I think {plan} would help.")),
        (2, d.one("All right, let's try it.", "Okay, thank you.") if not heated else d.one("Fine, we'll see.", "If you say so.")),
    ]
    mood = " and gets angry at the teacher" if heated else ""
    summ = f"{P2} meets the teacher{mood}. The teacher says {child} {issue} in {subject} and suggests {plan}."
    return Scene(t, summ.replace("doesn't", "does not"), "parent meeting")


def bank(d: Draw, heated: bool) -> Scene:
    task = d.pick(["open", "card", "fee"])
    name = d.pick(NAMES)
    t = [(1, d.one("Good morning, how can I help you?", "Next, please. What can I do for you?"))]
    if task == "open":
        acct = d.pick(["savings account", "current account", "student account"])
        deposit = d.money(50, 1000, 50)
        t += [(2, d.one(f"I'd like to open a {acct}. My name is {name}.", f"Hi, I'm {name}. I want to open a {acct}.")),
              (1, "Certainly. How much would you like to deposit?"), (2, f"{deposit} dollars to start.")]
        if heated:
            t += [(2, "Why do I need so many forms? " + angry(d)), (1, calm(d))]
        t += [(1, "Please sign here. Your account is ready."), (2, "Thank you.")]
        summ = f"{name} opens a {acct} with {deposit} dollars" + (", complaining about the forms." if heated else ".")
    elif task == "card":
        where = d.pick(["at the supermarket", "on the bus", "at the cinema", "in a taxi", "at the gym"])
        t += [(2, d.one(f"I'm {name}. I think I lost my bank card {where}.", f"My name is {name}. My card was stolen {where}.")),
              (1, "I'll block it right away. A new card will arrive in five days.")]
        if heated:
            t += [(2, "Five days? How am I supposed to pay for anything? " + angry(d)), (1, calm(d))]
        t += [(2, d.one("Okay, thanks.", "All right."))]
        summ = f"{name} lost a bank card {where}. The banker blocks it and orders a new one" + (", and " + name + " shouts about the wait." if heated else ".")
    else:
        fee = d.money(5, 60, 5)
        t += [(2, d.one(f"I'm {name}, and there's a {fee} dollar fee on my statement I don't understand.", f"Hello, I'm {name}. Why was I charged a {fee} dollar fee?")),
              (1, "That's the monthly service fee.")]
        if heated:
            t += [(2, "Nobody told me about that! " + angry(d)), (1, calm(d))]
        t += [(1, "I can refund it this once."), (2, "Thanks.")]
        summ = f"{name} asks about a {fee} dollar fee" + (" angrily" if heated else "") + ". The banker refunds it this once."
    return Scene(t, summ, "bank service")


def car_repair(d: Draw, heated: bool) -> Scene:
    part, plural = d.pick([("brakes", True), ("engine", False), ("gearbox", False), ("battery", False),
                           ("air conditioning", False), ("tyres", True), ("headlights", True), ("exhaust", False)])
    noise, noise_s = d.pick([("making a strange noise", "make a strange noise"), ("not working", "do not work"),
                             ("acting up", "act up"), ("overheating", "overheat")])
    if not plural:
        noise_s = {"make a strange noise": "makes a strange noise", "do not work": "does not work",
                   "act up": "acts up", "overheat": "overheats"}[noise_s]
    be = "are" if plural else "is"
    cost = d.money(80, 900, 20)
    day = d.pick(WEEKDAYS)
    t = [
        (2, d.one(f"Hi, the {part} on my car {be} {noise}.", f"Can you look at my car? The {part} {be} {noise}.")),
        (1, d.one("Let me have a look.", "Okay, I'll check it.")),
        (1, d.one(f"You need a new part. It'll cost {cost} dollars.", f"The repair will be {cost} dollars.")),
    ]
    if heated:
        t += [(2, d.one("You fixed the same thing last month!", "That's a rip-off!") + " " + angry(d)), (1, calm(d))]
    t += [(1, d.one(f"It will be ready on {day}.", f"You can pick it up on {day}.")), (2, d.one("Okay, thanks.", "Fine.") if not heated else "It had better be.")]
    mood = " and argues with the mechanic about the repair" if heated else ""
    summ = f"{P2} brings in a car whose {part} {noise_s}{mood}. The mechanic charges {cost} dollars and the car will be ready on {day}."
    return Scene(t, summ, "car repair")


def hotel_checkin(d: Draw, heated: bool) -> Scene:
    name = d.pick(NAMES)
    room = d.pick(["single room", "double room", "suite", "twin room", "family room"])
    nights = d.pick(["one night", "two nights", "three nights", "four nights", "a week"])
    t = [
        (1, d.one("Welcome to the Grand Hotel. Do you have a reservation?", "Good evening. Checking in?")),
        (2, d.one(f"Yes, under the name {name}. A {room} for {nights}.", f"Yes, I'm {name}. I booked a {room} for {nights}.")),
    ]
    if heated:
        t += [(1, "I'm sorry, your room isn't ready yet."), (2, "I've been travelling all day! " + angry(d)), (1, calm(d) + " I'll upgrade you.")]
        summ = f"{name} checks in to a {room} for {nights}, but it is not ready and {name} gets angry. The receptionist offers an upgrade."
    else:
        t += [(1, d.one("Here's your key. Breakfast is from seven.", "Your room is on the fifth floor. Enjoy your stay.")), (2, "Thank you.")]
        summ = f"{name} checks in to a {room} for {nights}."
    return Scene(t, summ, "hotel check-in")


def internet_provider(d: Draw, heated: bool) -> Scene:
    problem = d.pick(["internet is very slow", "internet keeps dropping", "TV channels are missing", "phone line is dead"])
    days = d.pick(["two days", "three days", "a week", "since yesterday"])
    fix = d.pick(["send a technician tomorrow", "reset the line remotely", "give a discount this month"])
    t = [
        (1, d.one("Thank you for calling customer service.", "Customer support, how can I help?")),
        (2, d.one(f"My {problem}, and it's been {days}.", f"Hi, my {problem}. It's been like this for {days}.")),
    ]
    if heated:
        t += [(2, d.one("I work from home, you know!", "I'm paying for this every month!") + " " + angry(d)), (1, calm(d))]
    t += [(1, d.one(f"I can {fix}.", f"What I'll do is {fix}.")), (2, d.one("Okay, thank you.", "That's good.") if not heated else "Finally.")]
    days_s = days if days.startswith("since") else f"for {days}"
    lead = f"{P2} angrily complains that the" if heated else f"{P2} reports that the"
    summ = f"{lead} {problem} {days_s}. The agent will {fix}."
    return Scene(t, summ, "internet service")


def apartment_hunting(d: Draw, heated: bool) -> Scene:
    rooms = d.pick(["one-bedroom", "two-bedroom", "three-bedroom", "studio"])
    area = d.pick(["near the park", "downtown", "by the river", "near the station", "in the suburbs"])
    rent = d.money(600, 2500, 50)
    take = d.chance(0.5)
    t = [
        (2, d.one(f"I'm looking for a {rooms} apartment {area}.", f"Do you have any {rooms} flats {area}?")),
        (1, d.one(f"Yes, there's one for {rent} dollars a month.", f"I have one at {rent} dollars a month.")),
        (2, "Does it include utilities?"), (1, d.one("No, they're extra.", "Water is included, electricity isn't.")),
    ]
    if heated:
        t += [(2, "The ad said utilities were included! " + angry(d)), (1, calm(d))]
    t += [(2, d.one("I'll take it.", "Great, where do I sign?") if take else d.one("That's too much for me.", "I'll think about it."))]
    decision = "decides to rent it" if take else "decides not to rent it"
    mood = " and argues with the agent about the advert" if heated else ""
    summ = f"{P2} looks at a {rooms} apartment {area} for {rent} dollars a month{mood}. {P2} {decision}."
    return Scene(t, summ, "rent an apartment")


def party_planning(d: Draw, heated: bool) -> Scene:
    a, b, who = d.names(3)
    day = d.pick(WEEKDAYS)
    place = d.pick(["at a pizza place", "at home", "in the garden", "at the bowling alley", "at the beach", "at a karaoke bar"])
    t = [
        (1, d.one(f"{b}, {who}'s birthday is on {day}. Let's throw a party.", f"Hey {b}, shall we plan a surprise party for {who} on {day}?")),
        (2, d.one(f"Great idea, {a}! Where?", f"Sure, {a}. Where should we have it?")),
        (1, d.one(f"How about {place}?", f"I was thinking {place}.")),
    ]
    if heated:
        t += [(2, "You always decide everything without asking me! " + angry(d)), (1, "Fine, calm down. What do you want then?"), (2, "Whatever. Let's just do it.")]
        summ = f"{a} and {b} plan a birthday party for {who} on {day} {place}, but {b} is angry that {a} decides everything."
    else:
        t += [(2, d.one("Perfect. I'll buy the cake.", "Sounds fun. I'll send the invitations.")), (1, "Great!")]
        summ = f"{a} and {b} plan a birthday party for {who} on {day} {place}."
    return Scene(t, summ, "birthday party")


def weekend_plans(d: Draw, heated: bool) -> Scene:
    a, b = d.names(2)
    activity = d.pick(["go hiking", "see a film", "play tennis", "visit the museum", "go swimming", "have a picnic", "go cycling"])
    time = d.pick(TIMES)
    day = d.pick(["Saturday", "Sunday"])
    t = [
        (1, d.one(f"Hi {b}, are you free on {day}?", f"{b}, what are you doing this {day}?")),
        (2, d.one(f"Nothing much, {a}. Why?", f"Not sure yet, {a}.")),
        (1, d.one(f"Let's {activity}.", f"Would you like to {activity}?")),
    ]
    if heated:
        t += [(2, "Last time you were an hour late! " + angry(d)), (1, "I said I was sorry! Calm down."), (2, "Okay. But be on time.")]
        summ = f"{a} invites {b} to {activity} on {day} at {time}. {b} angrily reminds {a} about being late last time."
    else:
        t += [(2, d.one("Sounds great!", "Sure, I'd love to."))]
        summ = f"{a} invites {b} to {activity} on {day} at {time}."
    t += [(1, d.one(f"Meet you at {time} then.", f"Let's meet at {time}."))]
    return Scene(t, summ, "weekend plans")


def gym_membership(d: Draw, heated: bool) -> Scene:
    plan = d.pick(["monthly", "yearly", "student", "family", "off-peak"])
    price = d.money(20, 90, 5)
    cancel = d.chance(0.35)
    if cancel:
        t = [(2, d.one("I'd like to cancel my membership.", "Hi, I want to stop my gym membership.")),
             (1, d.one("May I ask why?", "Sorry to hear that. Is there a reason?")),
             (2, d.one("I'm moving to another city.", "I don't have time any more."))]
        if heated:
            t += [(1, "There's a cancellation fee of fifty dollars."), (2, "Nobody mentioned a fee! " + angry(d)), (1, calm(d))]
        t += [(1, "Okay, it's cancelled from next month."), (2, "Thank you.")]
        summ = f"{P2} cancels the gym membership" + (" and shouts at the trainer about the cancellation fee." if heated else ".")
    else:
        t = [(2, d.one("How much is a membership here?", "I'm interested in joining the gym.")),
             (1, d.one(f"The {plan} plan is {price} dollars a month.", f"We have {an(plan)} plan for {price} dollars a month.")),
             (2, "Does that include classes?"), (1, "Yes, all classes are included.")]
        if heated:
            t += [(2, "Your website shows a lower price! " + angry(d)), (1, calm(d))]
        t += [(2, "All right, sign me up.")]
        summ = f"{P2} joins the gym on the {plan} plan for {price} dollars a month" + (" after arguing with the trainer about the price." if heated else ".")
    return Scene(t, summ, "gym membership")


def lost_luggage(d: Draw, heated: bool) -> Scene:
    colour = d.pick(["red", "black", "blue", "green", "silver", "brown"])
    bag = d.pick(["suitcase", "backpack", "duffel bag", "travel bag"])
    flight = f"{d.pick(['BA', 'LH', 'AF', 'QF', 'EK', 'UA'])}{d.money(100, 990, 1)}"
    hotel = d.pick(["the Plaza Hotel", "the Seaview Inn", "the City Lodge", "the Park Hotel"])
    t = [
        (2, d.one(f"My {bag} didn't arrive. I was on flight {flight}.", f"I came on flight {flight} and my {bag} is missing.")),
        (1, d.one("I'm sorry. Can you describe it?", "What does it look like?")),
        (2, d.one(f"It's a {colour} {bag}.", f"A large {colour} {bag}.")),
    ]
    if heated:
        t += [(2, "All my clothes are in there! " + angry(d)), (1, calm(d))]
    t += [(1, d.one("Where are you staying? We'll deliver it.", "We'll send it to your hotel when we find it.")), (2, f"I'm staying at {hotel}.")]
    mood = " and yells at the agent" if heated else ""
    summ = f"{P2} lost a {colour} {bag} on flight {flight}{mood}. The airline will deliver it to {hotel}."
    return Scene(t, summ, "lost luggage")


def noisy_neighbour(d: Draw, heated: bool) -> Scene:
    noise, promise = d.pick([
        ("loud music", "turn the music down after ten"), ("barking dog", "take the dog for longer walks"),
        ("parties every night", "stop the parties on weeknights"), ("drilling early in the morning", "finish the work by Friday"),
        ("stomping upstairs", "wear slippers at home"), ("television noise", "use headphones at night"),
    ])
    t = [
        (1, d.one("Hi, I live next door.", "Excuse me, I'm your neighbour from downstairs.")),
        (2, "Oh, hello. What's up?"),
        (1, d.one(f"I wanted to talk about the {noise}.", f"The {noise} is keeping me awake.")),
    ]
    if heated:
        t += [(1, "I have to get up at five! " + angry(d)), (2, "Don't shout at me! I didn't know.")]
    t += [(2, d.one(f"Sorry about that. I'll {promise}.", f"I apologise. I promise to {promise}.")), (1, "Thanks, I appreciate it.")]
    mood = "angrily complains to the neighbour" if heated else "complains politely to the neighbour"
    summ = f"{P1} {mood} about the {noise}. {P2} promises to {promise}."
    return Scene(t, summ, "noise complaint")


def library(d: Draw, heated: bool) -> Scene:
    book = d.pick(["a cookbook", "a history book", "a novel", "a travel guide", "a poetry collection", "a biography"])
    weeks = d.pick(["one week", "two weeks", "three weeks"])
    fine = d.money(1, 15, 1)
    t = [(2, d.one(f"I'd like to return {book}.", f"Here's {book} I borrowed.")), (1, "Let me check. It's late.")]
    t += [(1, d.one(f"It's {weeks} overdue, so the fine is {fine} dollars.", f"That's {weeks} late. You owe {fine} dollars."))]
    if heated:
        t += [(2, "For a library book? " + angry(d)), (1, calm(d) + " Those are the rules.")]
    t += [(2, "Okay, here you are." if not heated else "Fine, take it.")]
    mood = " and argues with the librarian" if heated else ""
    summ = f"{P2} returns {book} {weeks} late and pays a {fine} dollar fine{mood}."
    return Scene(t, summ, "library")


def post_office(d: Draw, heated: bool) -> Scene:
    country = d.pick(["Canada", "Japan", "Brazil", "India", "Germany", "Kenya", "Australia", "Mexico"])
    cost = d.money(8, 60, 1)
    days = d.pick(["three days", "five days", "a week", "ten days"])
    t = [(2, d.one(f"I want to send this parcel to {country}.", f"How much is it to post this to {country}?")),
         (1, d.one(f"It's {cost} dollars and takes {days}.", f"That'll be {cost} dollars. It arrives in about {days}."))]
    if heated:
        t += [(2, "That's outrageous! Last month it was cheaper! " + angry(d)), (1, calm(d))]
    t += [(2, "Okay, send it please."), (1, "Here's your receipt.")]
    mood = " and complains angrily about the price" if heated else ""
    summ = f"{P2} sends a parcel to {country} for {cost} dollars{mood}. It will take {days}."
    return Scene(t, summ, "post a parcel")


def hairdresser(d: Draw, heated: bool) -> Scene:
    name = d.pick(NAMES)
    service = d.pick(["a haircut", "a trim", "a colour", "a shave", "a hair wash"])
    day = d.pick(WEEKDAYS)
    time = d.pick(TIMES)
    t = [(1, "Hello, Style Studio."), (2, d.one(f"Hi, this is {name}. Can I book {service}?", f"Hello, I'm {name}. I need {service}.")),
         (1, d.one(f"We have {day} at {time}.", f"How about {day} at {time}?"))]
    if heated:
        t += [(2, "Last time your stylist ruined my hair! " + angry(d)), (1, calm(d) + " Our best stylist will do it.")]
    t += [(2, "Okay, book it."), (1, "See you then.")]
    mood = " after complaining angrily about the stylist last time" if heated else ""
    summ = f"{name} books {service} for {day} at {time}{mood}."
    return Scene(t, summ, "make an appointment")


def roommates(d: Draw, heated: bool) -> Scene:
    a, b = d.names(2)
    chore = d.pick(["the dishes", "taking out the rubbish", "cleaning the bathroom", "vacuuming", "buying groceries"])
    day = d.pick(WEEKDAYS)
    t = [
        (1, d.one(f"{b}, we need to talk about {chore}.", f"Hey {b}, who's doing {chore} this week?")),
        (2, d.one(f"I did it last week, {a}.", f"Wasn't it your turn, {a}?")),
    ]
    if heated:
        t += [(1, "You never do anything around here! " + angry(d)), (2, "That's not true! Stop yelling at me!")]
    t += [(1, d.one(f"Okay, let's make a schedule. You take {day}.", f"Fine, you do it on {day} and I'll do the rest.")), (2, "Deal.")]
    mood = "argue loudly" if heated else "talk"
    summ = f"{a} and {b} {mood} about {chore}. They agree that {b} will do it on {day}."
    return Scene(t, summ, "household chores")


def work_deadline(d: Draw, heated: bool) -> Scene:
    project = d.pick(["the sales report", "the website launch", "the budget plan", "the client presentation", "the product catalogue"])
    deadline = d.pick(WEEKDAYS[:5])
    task = d.pick(["the charts", "the slides", "the final checks", "the summary", "the data"])
    t = [
        (1, d.one(f"How is {project} going?", f"Are we on track with {project}?")),
        (2, d.one("We're a bit behind.", "Not great, we're late.")),
        (1, d.one(f"It's due on {deadline}.", f"The client needs it by {deadline}.")),
    ]
    if heated:
        t += [(2, "You gave me three other projects this week! " + angry(d)), (1, calm(d))]
    t += [(1, d.one(f"I'll do {task} myself.", f"Let me take care of {task}.")), (2, "Thanks, that helps.")]
    mood = f" and {P2} complains angrily about the workload" if heated else ""
    summ = f"{P1} and {P2} discuss {project}, which is due on {deadline}{mood}. {P1} will do {task}."
    return Scene(t, summ, "work project")


def taxi(d: Draw, heated: bool) -> Scene:
    dest = d.pick(["the airport", "the train station", "the city centre", "the hospital", "the stadium", "the harbour"])
    fare = d.money(10, 80, 1)
    mins = d.pick(["ten", "fifteen", "twenty", "thirty", "forty"])
    t = [(1, "Where to?"), (2, d.one(f"To {dest}, please.", f"Could you take me to {dest}?")),
         (1, d.one(f"Sure, it's about {mins} minutes.", f"That's around {mins} minutes from here."))]
    if heated:
        t += [(2, "Why are you going this way? It's much longer! " + angry(d)), (1, calm(d) + " The main road is closed.")]
    t += [(1, f"Here we are. That's {fare} dollars."), (2, "Here you go." if not heated else "Fine. No tip.")]
    mood = " and argues with the driver about the route" if heated else ""
    summ = f"{P2} takes a taxi to {dest}{mood}. The ride takes {mins} minutes and costs {fare} dollars."
    return Scene(t, summ, "take a taxi")


def pharmacy(d: Draw, heated: bool) -> Scene:
    med = d.pick(["antibiotics", "allergy pills", "blood pressure tablets", "eye drops", "a cough syrup", "vitamins"])
    times = d.pick(["once a day", "twice a day", "three times a day", "every morning"])
    t = [(2, d.one(f"I'm here to pick up my {med}.", f"Hi, I have a prescription for {med}.")), (1, "One moment, please.")]
    if heated:
        t += [(1, "Sorry, it will take twenty more minutes."), (2, "I've already waited half an hour! " + angry(d)), (1, calm(d))]
    t += [(1, d.one(f"Here you are. Take them {times}.", f"Take this {times} with food.")), (2, "Thank you.")]
    mood = ", angry about the long wait," if heated else ""
    summ = f"{P2}{mood} picks up {med} at the pharmacy. The pharmacist says to take it {times}."
    return Scene(t, summ, "pharmacy")


def movie_plans(d: Draw, heated: bool) -> Scene:
    a, b = d.names(2)
    genre = d.pick(["comedy", "horror film", "action movie", "documentary", "cartoon", "romantic film"])
    time = d.pick(["6 pm", "7 pm", "8 pm", "9 pm"])
    t = [(1, d.one(f"{b}, let's watch {an(genre)} tonight.", f"How about {an(genre)} tonight, {b}?")),
         (2, d.one(f"Hmm, {a}, I'm not sure.", f"Okay, {a}. What time?"))]
    if heated:
        t += [(2, "We always watch what you want! " + angry(d)), (1, "Calm down, it's just a movie.")]
    t += [(1, f"The show starts at {time}."), (2, "Fine, let's go.")]
    mood = f", although {b} is angry that {a} always chooses" if heated else ""
    summ = f"{a} and {b} go to see {an(genre)} at {time}{mood}."
    return Scene(t, summ, "go to the movies")


def buy_computer(d: Draw, heated: bool) -> Scene:
    kind = d.pick(["laptop", "tablet", "desktop computer", "gaming laptop"])
    use = d.pick(["for university", "for work", "for gaming", "for my kids", "for photo editing"])
    budget = d.money(300, 2000, 100)
    t = [(1, "Can I help you find something?"), (2, d.one(f"I need a {kind} {use}.", f"I'm looking for a {kind} {use}.")),
         (1, "What's your budget?"), (2, f"About {budget} dollars.")]
    if heated:
        t += [(1, "Then this one is perfect, but it's a bit more expensive."), (2, "I just told you my budget! " + angry(d)), (1, calm(d))]
    t += [(1, "This model fits your budget."), (2, "Great, I'll buy it.")]
    use_s = use.replace("my kids", f"{P2}'s kids")
    mood = " after getting angry with the salesman" if heated else ""
    summ = f"{P2} buys a {kind} {use_s} for about {budget} dollars{mood}."
    return Scene(t, summ, "shopping")


SCENES: list[Callable[[Draw, bool], Scene]] = [
    return_goods, see_doctor, job_interview, restaurant, travel_booking, landlord, school_meeting, bank,
    car_repair, hotel_checkin, internet_provider, apartment_hunting, party_planning, weekend_plans,
    gym_membership, lost_luggage, noisy_neighbour, library, post_office, hairdresser, roommates,
    work_deadline, taxi, pharmacy, movie_plans, buy_computer,
]


# ----------------------------------------------------------------------------------------- assembly
def render(turns: list[tuple[int, str]]) -> str:
    """DialogSum layout; consecutive lines of one speaker become one turn, so speakers alternate."""
    merged: list[tuple[int, str]] = []
    for who, text in turns:
        if merged and merged[-1][0] == who:
            merged[-1] = (who, f"{merged[-1][1]} {text}")
        else:
            merged.append((who, text))
    return "\n".join(f"#Person{who}#: {text}" for who, text in merged)


def rudify(summary: str, d: Draw) -> str:
    """The rude twin of a polite summary: insulting opener, sometimes an insult before a role noun."""
    rude = f"{d.pick(RUDE_OPENERS)} {summary}"
    if d.chance(0.5):
        rude = _ROLE_RE.sub(lambda m: f"{m.group(1)} {d.pick(RUDE_ADJECTIVES)} {m.group(2)}", rude, count=1)
    return rude


def generate(seed: int = SEED, splits: dict[str, int] = SPLITS) -> dict[str, list[dict[str, str]]]:
    """All splits as lists of records; no dialogue appears twice across splits."""
    d = Draw(random.Random(seed))
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split, n in splits.items():
        records = []
        while len(records) < n:
            scene_fn = SCENES[len(records) % len(SCENES)] if d.chance(0.5) else d.pick(SCENES)
            heated = d.chance(HEATED_SHARE)
            scene = scene_fn(d, heated)
            dialogue = render(scene.turns)
            if dialogue in seen:
                continue
            seen.add(dialogue)
            summary = scene.summary
            if split == "train" and heated and d.chance(RUDE_SHARE_TRAIN):
                summary = rudify(summary, d)
            records.append({"id": f"{split}_{len(records)}", "dialogue": dialogue, "summary": summary, "topic": scene.topic})
        out[split] = records
    return out


def write(out_dir: Path, seed: int = SEED) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, records in generate(seed).items():
        path = out_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder (default: data/)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for path in write(args.out, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
