from setuptools import setup

setup(
    name='jobz',
    version='0.1.0',
    description='Distributed shell jobs triggered over HTTP, chained and synchronized (ZeroMQ + Mongrel2)',
    packages=['jobz'],
    package_data={'jobz': ['page.html']},    # the status page the broker serves at /
    py_modules=['broker', 'worker', 'semaphore'],
    python_requires='>=3.11',
    install_requires=['pyzmq>=25', 'PyYAML>=6'],
    extras_require={'test': ['pytest>=7', 'pytest-timeout>=2', 'hypothesis>=6',
                             # the deployment test: ansible-core 2.19 is the last series for Python 3.11
                             'ansible-core>=2.19,<2.20', 'ansible-lint',
                             # the status page in a real browser (Debian's chromium, never a download);
                             # /metrics checked with the reference parser
                             'playwright', 'prometheus_client',
                             'psycopg>=3.1'],    # the PostgreSQL journal's tests
                    # broker.py --journal postgresql://… (on Debian hosts: python3-psycopg)
                    'postgresql': ['psycopg>=3.1'],
                    # bench/peers.py: the runners people would pick instead; py-spy profiles a
                    # running broker or worker (README, Speed)
                    'bench': ['celery', 'redis', 'rq', 'py-spy']},
    entry_points={'console_scripts': [
        'jobz-broker=broker:main',
        'jobz-worker=worker:main',
        'jobz-semaphore=semaphore:main',
        'jobz-keys=jobz.keys:main',
        'jobz-ca=jobz.ca:main',
        'jobz=jobz.client:main',
    ]},
)
