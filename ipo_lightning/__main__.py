"""``python -m ipo_lightning {fit,validate,test} --config X.yaml``."""

from ipo_lightning.entry import main

if __name__ == "__main__":
    main()
