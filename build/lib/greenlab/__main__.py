from greenlab.run import main

if __name__ == "__main__":
    main()
