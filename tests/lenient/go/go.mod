module lenient

go 1.19
