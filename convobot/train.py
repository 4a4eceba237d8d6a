"""`python -m convobot.train` and `torchrun -m convobot.train`: the training recipe's entry point under its old
name (convobot/training/recipe.py)."""

from convobot.training.recipe import main

if __name__ == "__main__":
    main()
