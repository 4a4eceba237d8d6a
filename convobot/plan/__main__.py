from convobot.plan.cli import main

main()
