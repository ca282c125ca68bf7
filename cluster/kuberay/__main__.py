from cluster.kuberay import main

raise SystemExit(main())
