"""What is done with a trained run: inference, merging the adapter into its backbone."""
