"""Reports built from measurements: `lowbit report` (`lowbit.reports.compression`, `lowbit.reports.tables`)."""
