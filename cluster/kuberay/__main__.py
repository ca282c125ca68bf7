from coact.cluster.kuberay import main

raise SystemExit(main())
