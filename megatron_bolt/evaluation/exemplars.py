"""The project's fixed few-shot exemplars, written in latent form.

The BoLT reference evaluates with fixed exemplars whose worked reasoning sits inside the latent
(ryoungj/BoLT configs/eval/task_configs: `latent_gsm8k_cot_synthetic_alt.yaml`, 8 shots;
`math_cot/utils.py` `list_fewshot_samples_for_latent_synthetic`, 4 shots;
`mmlu_cot/latent_mmlu_cot_synthetic/_latent_mmlu_cot_synthetic_template.yaml`, 4 shots). These are
this project's own problems and reasoning in the same layout, not copies of the reference's:

- GSM8K: the latent works the problem and ends "Therefore, the answer is N."; after EoL comes
  " The final answer is N. I hope it is correct."
- MATH: the latent works the problem and ends with the line "The final answer is $X$"; after EoL
  comes " Final Answer: The final answer is $X$. I hope it is correct."
- MMLU-STEM: the latent weighs the options and ends "Thus, the answer is (L) text."; after EoL
  comes " The answer is (L) text."

None of the problems is taken from a test set.
"""

from __future__ import annotations

# (question, latent, answer)
GSM8K = [
    ("A baker makes 24 muffins in the morning and 18 muffins in the afternoon. She sells 35 of them. "
     "How many muffins does she have left?",
     "The baker makes muffins twice in the day. In the morning she makes 24 and in the afternoon 18, so "
     "she makes 24 + 18 = 42 muffins in total.\n\nShe sells 35 of them. The muffins left are the total "
     "minus the ones sold: 42 - 35 = 7.\n\nTherefore, the answer is 7.",
     "7"),
    ("Tom reads 12 pages of a book every day. The book has 180 pages. How many pages does he still have "
     "to read after 9 days?",
     "Tom reads the same number of pages each day, so the pages read in 9 days are 12 * 9 = 108.\n\n"
     "The pages still to read are the length of the book minus the pages already read: 180 - 108 = 72.\n\n"
     "Therefore, the answer is 72.",
     "72"),
    ("A pack of 6 pencils costs $3. Single pencils are sold at the same price per pencil as in the pack. "
     "How much do 5 packs and 4 single pencils cost?",
     "First find the price of one pencil: a pack of 6 costs $3, so one pencil costs 3 / 6 = $0.50.\n\n"
     "Five packs cost 5 * 3 = $15. Four single pencils cost 4 * 0.50 = $2.\n\n"
     "Together they cost 15 + 2 = $17. Therefore, the answer is 17.",
     "17"),
    ("A garden has 5 rows of tomato plants with 8 plants in each row. Each plant gives 3 tomatoes. How many "
     "tomatoes does the garden give?",
     "The number of plants is the number of rows times the plants per row: 5 * 8 = 40 plants.\n\n"
     "Each plant gives 3 tomatoes, so the garden gives 40 * 3 = 120 tomatoes.\n\n"
     "Therefore, the answer is 120.",
     "120"),
    ("Maria is 4 years older than her brother. The sum of their ages is 30. How old is Maria?",
     "Let B be the brother's age. Maria is 4 years older, so her age is B + 4.\n\n"
     "The sum of the ages is 30:\nB + (B + 4) = 30\n2B + 4 = 30\n2B = 26\nB = 13.\n\n"
     "Maria's age is 13 + 4 = 17. Therefore, the answer is 17.",
     "17"),
    ("A train travels at 60 miles per hour for 2 hours and then at 45 miles per hour for 3 hours. How many "
     "miles does it travel in total?",
     "Distance is speed times time. In the first part the train covers 60 * 2 = 120 miles. In the second "
     "part it covers 45 * 3 = 135 miles.\n\nThe total distance is 120 + 135 = 255 miles.\n\n"
     "Therefore, the answer is 255.",
     "255"),
    ("A class of 28 students is split into teams of 4. Each team needs 2 balls. How many balls does the "
     "class need?",
     "The number of teams is the number of students divided by the team size: 28 / 4 = 7 teams.\n\n"
     "Each team needs 2 balls, so the class needs 7 * 2 = 14 balls.\n\nTherefore, the answer is 14.",
     "14"),
    ("Sam earns $15 per hour and works 8 hours a day for 5 days. He spends a quarter of his earnings on "
     "rent. How much money does he have left?",
     "Sam earns 15 * 8 = $120 per day. Over 5 days he earns 120 * 5 = $600.\n\n"
     "A quarter of his earnings goes to rent: 600 / 4 = $150.\n\n"
     "The money left is 600 - 150 = $450. Therefore, the answer is 450.",
     "450"),
]

# (problem, latent without its closing line, final answer as LaTeX)
MATH = [
    ("Find the value of $x$ if $3x - 7 = 11$.",
     "To solve the linear equation, isolate $x$. Add 7 to both sides:\n3x = 18.\n\n"
     "Divide both sides by 3:\nx = 6.\n\nCheck: $3 \\cdot 6 - 7 = 18 - 7 = 11$, which matches.",
     "6"),
    ("What is the sum of the interior angles of a convex hexagon, in degrees?",
     "A convex polygon with $n$ sides can be cut from one vertex into $n - 2$ triangles, and the angles of "
     "each triangle add up to 180 degrees. So the interior angles add up to $(n - 2) \\cdot 180$.\n\n"
     "A hexagon has $n = 6$ sides, so the sum is $(6 - 2) \\cdot 180 = 4 \\cdot 180 = 720$ degrees.",
     "720"),
    ("How many positive divisors does $36$ have?",
     "Write 36 as a product of primes: $36 = 4 \\cdot 9 = 2^2 \\cdot 3^2$.\n\n"
     "A divisor has the form $2^a 3^b$ with $0 \\le a \\le 2$ and $0 \\le b \\le 2$. There are 3 choices for "
     "$a$ and 3 choices for $b$, so there are $3 \\cdot 3 = 9$ divisors.\n\n"
     "Listing them confirms it: 1, 2, 3, 4, 6, 9, 12, 18, 36.",
     "9"),
    ("Simplify $\\frac{2}{3} + \\frac{1}{6}$.",
     "To add fractions, write them over a common denominator. The least common multiple of 3 and 6 is 6.\n\n"
     "$\\frac{2}{3} = \\frac{4}{6}$, so the sum is $\\frac{4}{6} + \\frac{1}{6} = \\frac{5}{6}$.\n\n"
     "The numerator 5 and the denominator 6 share no factor, so the fraction is already in lowest terms.",
     "\\frac{5}{6}"),
]

# (question, four choices, index of the answer, latent)
MMLU_STEM = [
    ("What is the derivative of $x^3$ with respect to $x$?",
     ("$x^2$", "$3x^2$", "$3x$", "$x^4/4$"), 1,
     "The power rule says that the derivative of $x^n$ is $n x^{n-1}$. Here $n = 3$, so the derivative is "
     "$3x^2$.\n\nOption (A) drops the factor 3, option (C) lowers the power by two instead of one, and option "
     "(D) is an antiderivative, not a derivative.\n\nThus, the answer is (B) $3x^2$."),
    ("A car speeds up uniformly from rest to 20 m/s in 5 s. What is its acceleration?",
     ("4 m/s^2", "2 m/s^2", "5 m/s^2", "100 m/s^2"), 0,
     "Uniform acceleration is the change in velocity divided by the time taken: a = (20 m/s - 0 m/s) / 5 s "
     "= 4 m/s^2.\n\nOption (D) multiplies instead of dividing, and options (B) and (C) match no step of the "
     "calculation.\n\nThus, the answer is (A) 4 m/s^2."),
    ("How many moles of water are in 36 grams of water?",
     ("0.5", "1", "2", "18"), 2,
     "The molar mass of water, H2O, is 2 * 1 g/mol for the hydrogen plus 16 g/mol for the oxygen, which is "
     "18 g/mol.\n\nThe number of moles is the mass divided by the molar mass: 36 g / 18 g/mol = 2 mol.\n\n"
     "Thus, the answer is (C) 2."),
    ("What is the worst-case time complexity of binary search on a sorted array of n elements?",
     ("O(n)", "O(n log n)", "O(1)", "O(log n)"), 3,
     "Binary search compares the target with the middle element and keeps only the half that can still "
     "contain it. Each step halves the range, so after k steps about n / 2^k elements remain, and the search "
     "ends when k is about log2 n.\n\nThe worst case therefore takes O(log n) comparisons.\n\n"
     "Thus, the answer is (D) O(log n)."),
]
